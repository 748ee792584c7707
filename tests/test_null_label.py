"""The null label (classifier-free guidance's "no class") must be a label the model embeds and
not one of the data's: checked before training or sampling, not found by an IndexError mid-run."""

from pathlib import Path

import pytest
import torch

import zoo
from zoo.diffusion.setup import check_null_label
from zoo.errors import UserError
from zoo.sample import SampleRequest, num_classes, sample_latents

RECIPES = Path(__file__).parent / "recipes"
EMOJI = Path(__file__).parents[1] / "recipes" / "emoji32"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("recipe", [RECIPES / "tiny_train.yaml", RECIPES / "tiny_dimr_pixels.yaml", EMOJI / "uvit.yaml"],
                         ids=["dit", "dimr", "uvit"])
def test_num_labels_is_the_label_table_of_every_backbone(recipe):
    """``num_labels`` is what the model's forward accepts: label num_labels - 1 runs, num_labels fails."""
    model = zoo.build_model(zoo.load_recipe(recipe)).eval()
    x, t, _ = model.example_inputs(1)
    rows = model.num_labels
    with torch.no_grad():
        model(x, t, torch.tensor([rows - 1]))
        with pytest.raises(UserError, match=rf"label {rows} is out of range: this .* embeds labels 0..{rows - 1}"):
            model(x, t, torch.tensor([rows]))  # an IndexError from the embedding before forward checked labels
    tables = [m.num_embeddings for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    assert tables and set(tables) == {rows}  # the check's range is the label tables' own
    with pytest.raises(UserError, match=rf"null_label is {rows}, but the model embeds labels 0..{rows - 1} only"):
        check_null_label(model, rows)
    check_null_label(model, rows - 1)


def test_a_guided_sample_with_a_null_label_beyond_the_table_is_one_line():
    recipe = zoo.load_recipe(EMOJI / "uvit.yaml", ["model.num_classes=9", "data.num_classes=9"])  # null 9: no row
    model = zoo.build_model(recipe).eval()
    with pytest.raises(UserError) as err:
        sample_latents(model, recipe, SampleRequest(n=1, steps=1, cfg=2.0))
    # Every row is a class: the fix is no guidance, or a null row before training. U-ViT's "no guidance" is
    # scale 0. Moving the null label onto class 8 is not offered: emoji32 always has 9 classes, and
    # data.num_classes 8 is refused.
    assert "none is left for the null label" in err.value.message
    assert err.value.suggestion == ("sample without guidance (--cfg 0, or sample.cfg.scale: 0 in the recipe), or give "
                                    "the model a row for it before training (DiT: model.class_dropout_prob > 0 adds "
                                    "one; U-ViT and DiMR: model.num_classes 10)")
    # Data that can have fewer classes: moving the null label onto class 8 (one fix for both keys: a DiT's
    # was told 'set model.num_classes to 1001', which its weights cannot take) is said last, as what it is.
    recipe["data"] = {"dataset": "synthetic", "num_classes": 9}
    with pytest.raises(UserError) as err:
        sample_latents(model, recipe, SampleRequest(n=1, steps=1, cfg=2.0))
    assert err.value.suggestion.endswith("model.num_classes 10); --set diffusion.null_label=8 --set "
                                         "data.num_classes=8 would make class 8 the null label")


_TINY_UVIT = ["--set", "model.embed_dim=16", "--set", "model.depth=1", "--set", "data.image_size=8",
              "--set", "model.img_size=8", "--set", "train.sample_every=0", "--set", "train.val_every=0",
              "--set", "train.batch_size=4", "--steps", "1"]


@pytest.mark.parametrize("dataset, moved", [("emoji32", False), ("synthetic", True)])
def test_a_model_with_fewer_label_rows_than_classes_is_told_fixes_that_train(tmp_path, capsys, dataset, moved):
    """U-ViT with 8 label rows for emoji32's 9 classes was told its rows 'are all classes' and to set
    model.num_classes 9 (the same error again, now asking for 10), and to make class 7 the null label with
    data.num_classes 7, which emoji32 (always 9 classes) refuses. Each fix offered now trains."""
    from zoo.cli import main

    base = ["train", str(EMOJI / "uvit.yaml"), *_TINY_UVIT, "--set", f"data.dataset={dataset}"]
    assert main([*base, "--out", str(tmp_path / "bad"), "--set", "model.num_classes=8"]) == 2
    err = capsys.readouterr().err
    assert "label rows 0..7 are fewer than the data's classes (data.num_classes 9)" in err
    assert "U-ViT and DiMR: model.num_classes 10)" in err and "label_drop=0" not in err
    assert ("--set diffusion.null_label=7 --set data.num_classes=7 would make class 7" in err) is moved
    fixes = [["--set", "model.num_classes=10"]]
    fixes += [["--set", "model.num_classes=8", "--set", "diffusion.null_label=7", "--set", "data.num_classes=7"]] * moved
    for k, fix in enumerate(fixes):
        assert main([*base, "--out", str(tmp_path / f"run{k}"), *fix]) == 0, capsys.readouterr().err


def test_zoo_build_refuses_what_zoo_sample_would_for_a_dit_without_a_null_row(capsys):
    """class_dropout_prob 0 builds a DiT with no null row: zoo build passed it, and zoo sample's guided default
    was then refused with the advice to make class 8 the null label."""
    from zoo.cli import main

    tiny = ["--set", "model.class_dropout_prob=0", "--set", "diffusion.label_drop=0"]
    assert main(["build", str(EMOJI / "dit.yaml"), *tiny]) == 2
    err = capsys.readouterr().err
    assert "key diffusion.null_label" in err and "(sample without guidance (--cfg 1, or sample.cfg.scale: 1" in err
    assert main(["build", str(EMOJI / "dit.yaml"), *tiny, "--set", "sample.cfg.scale=1"]) == 0


@pytest.mark.parametrize("null", [0, 2])
def test_a_null_label_among_the_data_labels_is_refused(null):
    """0 used to pass (a falsy value skipped the check): class 0 then doubled as "no class"."""
    recipe = {"model": {"type": "dit", "num_classes": 4}, "diffusion": {"null_label": null}, "data": {"num_classes": 4}}
    with pytest.raises(UserError, match=f"diffusion.null_label {null} is one of its labels 0..3"):
        num_classes(recipe)
    assert num_classes({**recipe, "diffusion": {"null_label": 4}}) == 4


def test_an_unconditional_dimr_is_told_a_fix_that_trains(tmp_path, capsys):
    """model.num_classes 1 (the null row only) was told --set data.num_classes=0, which is refused; and
    with the null label 0 and no data classes, every label fell outside 'the model's classes 0..-1'."""
    from zoo.cli import main

    recipe, out = str(RECIPES / "tiny_dimr_pixels.yaml"), str(tmp_path / "run")
    base = ["--out", out, "--steps", "1", "--set", "model.num_classes=1", "--set", "data.dataset=synthetic",
            "--set", "train.sample_every=0", "--set", "train.batch_size=2"]
    assert main(["train", recipe, *base]) == 2
    fix = "--set diffusion.null_label=0 --set data.num_classes=null"
    assert f"({fix}: its last label row" in capsys.readouterr().err
    assert main(["train", recipe, *base, *fix.split()]) == 0
    assert num_classes(zoo.load_recipe(recipe, ["model.num_classes=1", *fix.replace("--set ", "").split()])) is None


@pytest.mark.parametrize("recipe, overrides, count, key", [
    (RECIPES / "tiny_train.yaml", ["model.num_classes=2", "model.class_dropout_prob=0", "diffusion.label_drop=0"],
     4, "data.num_classes"),
    (RECIPES / "tiny_dimr_pixels.yaml", ["model.num_classes=1", "diffusion.label_drop=0"], 10, "data.num_classes"),
    (RECIPES / "tiny_train.yaml", ["model.num_classes=2", "model.class_dropout_prob=0", "diffusion.label_drop=0",
                                   "data.num_classes=null"], 4, "diffusion.null_label"),
], ids=["dit", "dimr", "dit-null-only"])
def test_classes_beyond_the_label_table_are_refused_before_the_run_without_label_dropout(recipe, overrides, count, key):
    """With no label dropout nothing compared the data's classes with the label table: zoo build passed
    and zoo train failed at step 1 on an out-of-range label, leaving an empty run directory."""
    from zoo.training.fit import check_recipe_fits_model

    resolved = zoo.load_recipe(recipe, overrides)
    with torch.device("meta"):
        model = zoo.build_model(resolved)
    with pytest.raises(UserError, match=rf"{key} is {count}: labels 0..{count - 1} are classes, but the model "
                       rf"embeds labels 0..{model.num_labels - 1} only") as err:
        check_recipe_fits_model(resolved, model)
    assert err.value.key_path == key


@pytest.mark.parametrize("data, null", [(4, 4), (3, 3), (3, 2)])
def test_a_dit_with_fewer_classes_than_its_data_is_told_so_and_both_fixes_build(data, null, capsys):
    """A DiT with label dropout has a null row of its own after its model.num_classes rows. Two classes
    against four in the data were told "the model's label rows 0..2 are all classes", that DiT's
    class_dropout_prob > 0 would add the row it already had, and first to set diffusion.label_drop=0,
    itself refused (the model drops labels with class_dropout_prob): the mistake is the class count."""
    from zoo.cli import main

    recipe = str(RECIPES / "tiny_train.yaml")
    given = ["--set", "model.num_classes=2", "--set", f"data.num_classes={data}", "--set", f"diffusion.null_label={null}"]
    assert main(["build", recipe, *given]) == 2
    err = capsys.readouterr().err
    assert "key data.num_classes" in err and (f"data.num_classes is {data}, but the model has 2 classes (labels 0..1; "
                                              "its label row 2 is the null label)") in err, err
    assert f"(model.num_classes: {data} (and diffusion.null_label: {data}), or data.num_classes: 2 (and " \
           "diffusion.null_label: 2))" in err
    for fix in ([f"model.num_classes={data}", f"diffusion.null_label={data}"], ["data.num_classes=2", "diffusion.null_label=2"]):
        assert main(["build", recipe, *given, *[a for kv in fix for a in ("--set", kv)]]) == 0, capsys.readouterr().err


def test_a_dit_without_a_null_row_and_fewer_classes_than_emoji32_is_told_the_count_to_give():
    """A DiT with class_dropout_prob 0 and model.num_classes 8 (8 label rows, all classes) on emoji32's 9
    classes: the DiT fix names the class count to build it with, 9, not its own 8 (which would still
    leave a class without a row)."""
    recipe = zoo.load_recipe(EMOJI / "dit.yaml", ["model.class_dropout_prob=0", "model.num_classes=8"])
    with torch.device("meta"):
        model = zoo.build_model(recipe)
    assert model.num_labels == 8
    with pytest.raises(UserError) as err:
        check_null_label(model, 8, {"dataset": "emoji32", "num_classes": 9})
    assert "DiT: model.class_dropout_prob > 0 adds one with model.num_classes 9;" in err.value.suggestion
    assert "U-ViT and DiMR: model.num_classes 10)" in err.value.suggestion


class _Rows(torch.nn.Module):
    num_labels = 10


def test_a_dataset_with_exactly_one_class_fewer_than_the_rows_is_offered_the_moved_null_label():
    """emoji32 has 9 class names; with 10 label rows, all classes by data.num_classes 10, its 9 classes fit
    below row 9, so making class 9 the null label is a fix (offered last); one class more would not fit."""
    with pytest.raises(UserError) as err:
        check_null_label(_Rows(), 10, {"dataset": "emoji32", "num_classes": 10})
    assert err.value.suggestion.endswith("; --set diffusion.null_label=9 --set data.num_classes=9 would make class 9 "
                                         "the null label")
