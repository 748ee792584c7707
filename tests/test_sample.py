"""``zoo sample``: per-sample seeding, batch-size independence, the PNG grid, checkpoints, the VAE."""

import math
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import zoo
from zoo.checkpoint import save_checkpoint
from zoo.cli import main
from zoo.errors import UserError
from zoo.sample import SampleRequest, load_model, sample_latents
from zoo.seeds import initial_noise, sample_labels, sample_seed

RECIPES = Path(__file__).parent / "recipes"
PIXELS = RECIPES / "tiny_dit_pixels.yaml"
LATENT = RECIPES / "tiny_dit_latent.yaml"
DIMR = RECIPES / "tiny_dimr_pixels.yaml"


pytestmark = pytest.mark.usefixtures("one_thread")


def _trained_like(recipe_path, scale=0.02, seed=0):
    """The tiny DiT with every weight nudged off its zero init (a fresh DiT predicts ε = 0 everywhere)."""
    recipe = zoo.load_recipe(recipe_path)
    model = zoo.build_model(recipe)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))
    return model.eval(), recipe


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model, recipe = _trained_like(PIXELS)
    path = tmp_path_factory.mktemp("ckpt") / "last"
    save_checkpoint(path, model, recipe, ema=model)
    return path


def test_per_sample_seeds_are_distinct_and_split_independent():
    seeds = {sample_seed(s, i, stream) for s in (0, 1, 2) for i in range(1000) for stream in (0, 1)}
    assert len(seeds) == 6000 and max(seeds) < 2**32  # PyTorch's CPU generator keeps 32 bits
    whole = initial_noise(6, (3, 4, 4), seed=7)
    assert torch.equal(whole[3:], initial_noise(3, (3, 4, 4), seed=7, start=3))
    assert not torch.equal(whole, initial_noise(6, (3, 4, 4), seed=8))
    labels = sample_labels(500, 10, seed=7)
    assert torch.equal(labels[100:], sample_labels(400, 10, seed=7, start=100))
    assert labels.min() == 0 and labels.max() == 9


@pytest.mark.parametrize("start, n, classes", [(0, 50, 10), (7, 23, 10), (995, 10, 1000), (0, 50000, 1000)])
def test_balanced_labels_are_the_index_modulo_the_classes(start, n, classes):
    """sample.labels: balanced (DiMR's evaluation): sample i is class i % K from any start, so every class
    is drawn n/K times where K divides n, and a shorter run's labels are the start of a longer one's."""
    labels = sample_labels(n, classes, seed=3, start=start, draw="balanced")
    assert labels.dtype == torch.long and torch.equal(labels, torch.arange(start, start + n) % classes)
    if start == 0 and n % classes == 0:
        assert torch.bincount(labels, minlength=classes).tolist() == [n // classes] * classes
    assert torch.equal(sample_labels(n, classes, seed=3, start=start), sample_labels(n, classes, 3, start, "random"))


def test_the_recipes_label_draw_reaches_sample_latents_and_given_classes_win(checkpoint):
    """sample.labels: balanced draws i % K where no class is given (zoo sample, the training grids); --class
    still wins; an unconditional model draws no labels and is not refused."""
    model, recipe, _ = load_model(checkpoint)
    balanced = {**recipe, "sample": {**recipe["sample"], "labels": "balanced"}}
    _, y = sample_latents(model, balanced, SampleRequest(n=12, steps=2))
    assert y.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    _, y = sample_latents(model, balanced, SampleRequest(n=3, class_labels=[4], steps=2))
    assert y.tolist() == [4, 4, 4]
    _, y = sample_latents(model, recipe, SampleRequest(n=12, steps=2))
    assert torch.equal(y, sample_labels(12, 10, seed=0))  # the default: random, as before
    plain = zoo.load_recipe(PIXELS, ["sample.labels=balanced", "model.num_classes=1", "data.num_classes=null",
                                     "diffusion.null_label=0", "sample.cfg.scale=1"])  # unconditional
    x, y = sample_latents(zoo.build_model(plain), plain, SampleRequest(n=3, steps=2))
    assert y is None and x.shape == (3, 3, 8, 8)


def test_the_dimr_paper_recipes_draw_balanced_labels_as_dimrs_evaluation():
    """DiMR's released eval.py (256 and 512 px) gives every class 50 of the 50K samples (its FIDs were measured
    so); DiT's and U-ViT's draw classes at random, zoo's default, and so do the 64-px DiMRs, whose setup the paper
    says is U-ViT's (and Table 2's rows, U-ViT's among them, evaluate alike)."""
    from zoo.seeds import label_draw

    shipped = Path(zoo.__file__).parent.parent / "recipes"
    draws = {str(path.relative_to(shipped)): label_draw(zoo.load_recipe(path))
             for path in sorted(shipped.rglob("*.yaml")) if not path.name.startswith("_")}
    latent_dimr = {n for n in draws if n.startswith("dimr_") and zoo.load_recipe(shipped / n)["data"].get("latent")}
    assert latent_dimr == {"dimr_xl_2r.yaml", "dimr_xl_3r.yaml", "dimr_g_2r.yaml"}
    assert {name for name, draw in draws.items() if draw == "balanced"} == latent_dimr
    assert draws["dit_xl_2.yaml"] == draws["uvit_h_2.yaml"] == draws["dimr_m_3r.yaml"] == "random"
    assert {draws[n] for n in draws if n.startswith("ablation/")} == {"random"}


@pytest.mark.parametrize("recipe_path, side", [(PIXELS, 8), (DIMR, 16)])
def test_same_samples_whatever_the_batch_size_float64(recipe_path, side):
    """Sample i does not depend on the batch split: DiT (guided 3 channels, learned σ, multistep
    DPM-Solver++) and DiMR (per-branch outputs, guidance with the power decay, singlestep order 3)."""
    model, recipe = _trained_like(recipe_path)
    model = model.double()
    runs = [sample_latents(model, recipe, SampleRequest(n=5, seed=3, steps=3, batch_size=b)) for b in (1, 2, 5)]
    x, y = runs[0]
    assert x.shape == (5, 3, side, side) and x.dtype == torch.float64  # the model's dtype
    for other, labels in runs[1:]:
        assert torch.equal(labels, y)
        assert torch.allclose(other, x, rtol=0, atol=1e-6 * x.abs().max().item())


@pytest.mark.parametrize("solver, options", [("ddpm", {}), ("ddim", {"eta": 1.0})])
def test_stochastic_solvers_give_the_same_samples_whatever_the_batch_size(solver, options):
    """Per-step noise comes from one generator per sample, so ancestral sampling is split-independent too."""
    model, recipe = _trained_like(PIXELS)
    model = model.double()
    request = dict(n=5, seed=3, steps=4, solver=solver, solver_options=options)
    x, _ = sample_latents(model, recipe, SampleRequest(batch_size=1, **request))
    for b in (2, 5):
        other, _ = sample_latents(model, recipe, SampleRequest(batch_size=b, **request))
        assert torch.allclose(other, x, rtol=0, atol=1e-6 * x.abs().max().item())
    other_seed, _ = sample_latents(model, recipe, SampleRequest(batch_size=5, **{**request, "seed": 4}))
    assert (other_seed - x).abs().max() > 1e-2


def test_same_samples_whatever_the_batch_size_float32(checkpoint):
    model, recipe, origin = load_model(checkpoint)
    assert origin.startswith("ema weights")
    a, _ = sample_latents(model, recipe, SampleRequest(n=4, seed=0, steps=3, batch_size=1))
    b, _ = sample_latents(model, recipe, SampleRequest(n=4, seed=0, steps=3, batch_size=3))
    again, _ = sample_latents(model, recipe, SampleRequest(n=4, seed=0, steps=3, batch_size=3))
    assert torch.equal(b, again)  # reproducible for a seed
    # The backbone's float32 GEMMs round differently per batch size (~1e-7); the solver divides by α_T.
    assert (a - b).abs().max() <= 1e-6 * a.abs().max()
    c, _ = sample_latents(model, recipe, SampleRequest(n=4, seed=1, steps=3, batch_size=3))
    assert (c - b).abs().max() > 1e-2


def test_solver_flag_takes_set_options_of_that_solver(checkpoint):
    """``--solver ddpm --set sample.solver.clip_denoised=true``: the options are checked against ddpm, not the recipe's
    dpm_solver++ (which has no clip_denoised); the recipe's own solver keeps its options when --solver names it."""
    for source in (checkpoint, PIXELS):
        _, recipe, _ = load_model(source, ["sample.solver.clip_denoised=true"], solver="ddpm")
        assert recipe["sample"]["solver"] == {"type": "ddpm", "clip_denoised": True}
        _, recipe, _ = load_model(source, ["sample.solver.order=3"], solver="dpm_solver++")
        assert recipe["sample"]["solver"]["order"] == 3 and recipe["sample"]["solver"]["method"] == "multistep"
        _, recipe, _ = load_model(source, [], solver="ddpm")  # build_solver swaps it later; the recipe is untouched
        assert recipe["sample"]["solver"]["type"] == "dpm_solver++"
    with pytest.raises(UserError, match="unknown parameter 'order' of solver 'ddim'"):
        load_model(PIXELS, ["sample.solver.order=3"], solver="ddim")
    # --solver and a --set that names another solver: one would be dropped silently, so neither is taken
    with pytest.raises(UserError, match="--solver ddim and --set sample.solver \\(type ddpm\\) name two solvers"):
        load_model(PIXELS, ["sample.solver={type: ddpm, clip_denoised: true}"], solver="ddim")
    _, recipe, _ = load_model(PIXELS, ["sample.solver={type: ddim, eta: 0.5}"], solver="ddim")
    assert recipe["sample"]["solver"] == {"type": "ddim", "eta": 0.5}


def test_a_checkpoint_keeps_its_trained_diffusion_keys_and_may_be_given_a_missing_one(checkpoint, tmp_path):
    """--set diffusion.null_label=7 sampled with another null label than the weights learnt; the same value
    is no change, and a model-only checkpoint (no time_input, as zoo convert may write) needs one to sample."""
    own = zoo.load_recipe(PIXELS)["diffusion"]
    for change, key in (("null_label=7", "null_label"), ("time_input=uvit_discrete", "time_input"),
                        ("schedule.num_steps=500", "schedule"),
                        ("schedule.type=cosine", "schedule")):  # said "unknown parameter 'num_steps'" of its config.json
        with pytest.raises(UserError, match=f"--set diffusion.{key} would change what its weights were trained"):
            load_model(checkpoint, [f"diffusion.{change}"])
    with pytest.raises(UserError, match=r"did you mean eps\?"):  # a typo is a typo, not a change of training
        load_model(checkpoint, ["diffusion.prediction=epss"])
    _, recipe, _ = load_model(checkpoint, [f"diffusion.null_label={own['null_label']}", "diffusion.min_snr_gamma=5"])
    assert recipe["diffusion"]["min_snr_gamma"] == 5  # training-only keys change nothing in sampling
    model_only = zoo.load_recipe({"model": zoo.load_recipe(PIXELS)["model"]})
    save_checkpoint(tmp_path / "ckpt", zoo.build_model(model_only), model_only)
    given = [f"diffusion.time_input={own['time_input']}", "diffusion.label_drop=0.1",
             f"diffusion.null_label={own['null_label']}"]
    _, recipe, _ = load_model(tmp_path / "ckpt", given)
    assert recipe["diffusion"]["time_input"] == own["time_input"]


def test_a_checkpoints_unwritten_prediction_is_the_eps_it_was_trained_to_predict(tmp_path):
    """--set diffusion.prediction=v passed on a checkpoint whose recipe left prediction at its default:
    the eps-trained weights were read as v. An explicit eps is no change."""
    recipe = zoo.load_recipe(RECIPES / "tiny_train.yaml")
    assert "prediction" not in recipe["diffusion"]
    save_checkpoint(tmp_path / "ckpt", zoo.build_model(recipe), recipe)
    with pytest.raises(UserError, match="--set diffusion.prediction would change what its weights were trained"):
        load_model(tmp_path / "ckpt", ["diffusion.prediction=v"])
    assert load_model(tmp_path / "ckpt", ["diffusion.prediction=eps"])[1]["diffusion"]["prediction"] == "eps"
    # the unwritten schedule is DDPM's linear betas: naming it, or its table, is no change; other betas are
    for same in ("diffusion.schedule=linear", "diffusion.schedule={type: linear, beta_end: 0.02}"):
        load_model(tmp_path / "ckpt", [same])
    with pytest.raises(UserError, match="--set diffusion.schedule would change what its weights were trained"):
        load_model(tmp_path / "ckpt", ["diffusion.schedule={type: linear, beta_end: 0.03}"])


def test_sampling_hands_the_model_back_in_its_modes():
    """sample_latents left a model it was given in training in eval mode, so a user's training loop that
    sampled a preview stopped DiT's in-model label dropout from then on; a frozen part stays in eval."""
    recipe = zoo.load_recipe(RECIPES / "tiny_train.yaml")
    model = zoo.build_model(recipe).train()
    model.y_embedder.eval()  # a part the caller keeps frozen
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(module.training))
    sample_latents(model, recipe, SampleRequest(n=2, steps=2))
    assert seen and not any(seen)  # it sampled in eval mode
    assert model.training and not model.y_embedder.training
    assert all(m.training for name, m in model.named_modules() if not name.startswith("y_embedder"))


def test_class_and_guidance_options(checkpoint):
    model, recipe, _ = load_model(checkpoint)
    _, y = sample_latents(model, recipe, SampleRequest(n=3, class_labels=4, steps=2))
    assert y.tolist() == [4, 4, 4]
    with pytest.raises(UserError, match="0..9"):
        sample_latents(model, recipe, SampleRequest(n=1, class_labels=10, steps=2))
    off, _ = sample_latents(model, recipe, SampleRequest(n=2, cfg=1.0, steps=2))
    on, _ = sample_latents(model, recipe, SampleRequest(n=2, cfg=4.0, steps=2))
    assert (off - on).abs().max() > 1e-3
    for bad in (float("nan"), float("inf"), -5.0, 1001.0):  # --cfg of zoo sample / zoo eval: NaN gave black images
        with pytest.raises(UserError, match=r"guidance scale must be in \[0, 1000\]"):
            sample_latents(model, recipe, SampleRequest(n=1, cfg=bad, steps=2))


def test_class_labels_of_any_integer_type_and_nothing_else():
    """numpy's integers raised a TypeError, 2.7 became class 2, batch_size 0 meant the recipe's."""
    import numpy as np

    assert SampleRequest(class_labels=np.int64(3)).label_list() == [3]
    assert SampleRequest(class_labels=np.array([1, 2])).label_list() == [1, 2]
    assert SampleRequest(class_labels=torch.tensor(5)).label_list() == [5]
    assert SampleRequest(class_labels=(4, np.int32(0))).label_list() == [4, 0]
    for bad in (2.7, [1, 2.0], np.array([0.5]), torch.tensor([1.0]), "3"):
        with pytest.raises(UserError, match="class labels are integers"):
            SampleRequest(class_labels=bad).label_list()
    with pytest.raises(UserError, match=r"batch_size \(--batch-size\) must be at least 1, got 0"):
        SampleRequest(n=2, batch_size=0).count()


def test_per_sample_labels_and_given_noise_float64():
    """DiT's sample.py samples a list of labels from given noise: sample i depends only on (x_T[i], y[i])."""
    model, recipe = _trained_like(PIXELS)
    model = model.double()
    x_T = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    x, y = sample_latents(model, recipe, SampleRequest(class_labels=[3, 7, 1], x_T=x_T, steps=3))
    assert y.tolist() == [3, 7, 1] and x.shape == (3, 3, 8, 8) and x.dtype == torch.float64
    one, _ = sample_latents(model, recipe, SampleRequest(class_labels=[7], x_T=x_T[1:2], steps=3))
    assert (one[0] - x[1]).abs().max() <= 1e-12 * x.abs().max()  # float64 GEMMs round differently per batch
    other, _ = sample_latents(model, recipe, SampleRequest(class_labels=[3, 3, 1], x_T=x_T, steps=3))
    assert (other[1] - x[1]).abs().max() > 1e-3 and (other[2] - x[2]).abs().max() <= 1e-12 * x.abs().max()
    # given noise equal to the seeded noise gives the seeded samples
    seeded, _ = sample_latents(model, recipe, SampleRequest(n=3, seed=5, class_labels=2, steps=3))
    same, _ = sample_latents(model, recipe, SampleRequest(seed=5, class_labels=2, steps=3,
                                                          x_T=initial_noise(3, (3, 8, 8), seed=5)))
    assert (seeded - same).abs().max() <= 1e-12 * seeded.abs().max()
    for request, match in [(SampleRequest(n=4, class_labels=[1, 2, 3], steps=2), "give one label or 4"),
                           (SampleRequest(n=2, x_T=x_T, steps=2), "x_T gives 3 samples"),
                           (SampleRequest(x_T=x_T[:, :2], steps=2), "shape"),
                           (SampleRequest(class_labels=[1, 12], steps=2), r"class label 12 \(--class\)")]:
        with pytest.raises(UserError, match=match):
            sample_latents(model, recipe, request)
    f32, _ = sample_latents(model.float(), recipe, SampleRequest(class_labels=[3, 7, 1], x_T=x_T, steps=3))
    assert f32.dtype == torch.float32 and (f32.double() - x).abs().max() < 1e-4 * x.abs().max()


def test_cli_class_list_respacing_and_float64(checkpoint, tmp_path, capsys):
    out = tmp_path / "list.png"
    assert main(["sample", str(checkpoint), "--class", "3,7,1", "--solver", "ddim", "--respacing", "ddim4",
                 "--dtype", "float64", "--out", str(out), "--device", "cpu"]) == 0
    stdout = capsys.readouterr().out
    assert "'respacing': 'ddim4'" in stdout and "wrote 3 images" in stdout
    assert _png(out)[0] == (2 * (8 + 2) + 2, 2 * (8 + 2) + 2)  # ⌈√3⌉ = 2 columns, 2 rows
    assert main(["sample", str(checkpoint), "--class", "3,x", "--out", str(out)]) == 2
    assert "names no classes (give numbers" in capsys.readouterr().err
    assert main(["sample", str(checkpoint), "--class", "3,7", "--n", "5", "--out", str(out), "--device", "cpu"]) == 2
    assert "give one label or 5" in capsys.readouterr().err


def test_classes_by_name_where_the_dataset_names_them(tmp_path):
    from zoo.sample import parse_class_labels
    from zoo.training.data import class_names
    from zoo.training.emoji import CATEGORIES

    assert class_names({"dataset": "emoji32"}) == list(CATEGORIES)
    for folder in ("n02", "n01", "n03/extra"):
        (tmp_path / "images" / folder).mkdir(parents=True)
    assert class_names({"dataset": "image_folder", "root": str(tmp_path / "images")}) == ["n01", "n02", "n03"]
    assert class_names({"dataset": "imagenet", "root": str(tmp_path / "images")}) == ["n01", "n02", "n03"]
    (tmp_path / "lat").mkdir()
    (tmp_path / "lat" / "manifest.json").write_text('{"classes": ["cat", "dog"]}')
    assert class_names({"dataset": "imagenet", "latent": True, "root": str(tmp_path / "lat")}) == ["cat", "dog"]
    # Unknown where the root has gone (a checkpoint sampled on another machine) or was never named.
    assert class_names({"dataset": "image_folder", "root": str(tmp_path / "moved")}) == []
    assert class_names({"dataset": "synthetic"}) == class_names({}) == []

    assert parse_class_labels("flags, Smileys & Emotion,3,TRAVEL", CATEGORIES) == [2, 6, 3, 8]
    assert parse_class_labels("7", ()) == [7] and parse_class_labels(None, CATEGORIES) is None
    with pytest.raises(UserError, match="'s' matches 'Smileys & Emotion', 'Symbols'"):
        parse_class_labels("s", CATEGORIES)
    with pytest.raises(UserError, match=r"'dogs' is not one of its classes \(the classes are 0 Activities, 1 Animals"):
        parse_class_labels("flags,dogs", CATEGORIES)
    with pytest.raises(UserError, match="names no classes"):
        parse_class_labels("flags", ())


def test_class_names_match_across_unicode_forms_and_may_hold_a_comma():
    """A folder named on macOS is stored decomposed (NFD): 'café' typed (NFC) was not one of the classes;
    a class named 'dogs, wild' could not be picked by name."""
    import unicodedata

    from zoo.sample import parse_class_labels

    names = ["bird", unicodedata.normalize("NFD", "café"), "dogs, wild", "dogs"]
    assert parse_class_labels("café", names) == [1] and parse_class_labels("CAFÉ,bird", names) == [1, 0]
    assert parse_class_labels("dogs, wild", names) == [2] and parse_class_labels("dogs,bird", names) == [3, 0]


def test_a_number_is_a_label_even_where_a_class_folder_has_another_numbers_name(capsys):
    from zoo.sample import parse_class_labels

    names = ["10", "2", "Dog", "cat"]  # torchvision's order of folders 10, 2, Dog, cat
    assert parse_class_labels("2,1", names) == [2, 1]
    err = capsys.readouterr().err
    assert err == "zoo: warning: --class 2 is label 2 ('Dog'); the class named '2' is label 1 (--class 1)\n"
    assert parse_class_labels("cat", names) == [3] and capsys.readouterr().err == ""


def test_cli_samples_emoji_categories_by_name(tmp_path, capsys):
    out = tmp_path / "e.png"
    emoji = Path(__file__).resolve().parent.parent / "recipes" / "emoji32" / "dimr_2r.yaml"
    assert main(["sample", str(emoji), "--class", "flags,smileys", "--steps", "2", "--out", str(out),
                 "--device", "cpu"]) == 0
    assert "wrote 2 images" in capsys.readouterr().out
    assert main(["sample", str(emoji), "--class", "s", "--steps", "2", "--out", str(out), "--device", "cpu"]) == 2
    assert "matches 'Smileys & Emotion', 'Symbols'" in capsys.readouterr().err


def test_shipped_recipes_are_found_by_their_recipes_path_from_anywhere(tmp_path, monkeypatch, capsys):
    """zoo build and train found recipes/emoji32/dimr_2r.yaml from any directory, zoo sample did not;
    a path that is no shipped recipe's whole name is still a missing checkpoint, not a recipe."""
    monkeypatch.chdir(tmp_path)
    for source in ("recipes/emoji32/dimr_2r.yaml", "emoji32/dimr_2r"):
        assert main(["sample", source, "--n", "1", "--steps", "2", "--out", "e.png", "--device", "cpu"]) == 0
        assert "wrote 1 image (32x32)" in capsys.readouterr().out
    assert main(["sample", "runs/emoji32/dimr_2r", "--out", "e.png"]) == 2
    assert "runs/emoji32/dimr_2r does not exist" in capsys.readouterr().err


def test_a_folder_named_like_a_shipped_recipe_is_no_checkpoint_and_says_how_to_name_the_recipe(
        tmp_path, monkeypatch, capsys):
    """``./emoji32/dit/`` (an empty folder) takes the bare name: zoo sample said 'is a checkpoint: its model
    section is fixed' to a --set model.* there; it is no checkpoint, and the .yaml name reaches the recipe."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "emoji32" / "dit").mkdir(parents=True)
    for extra in ([], ["--set", "model.depth=2"]):
        assert main(["sample", "emoji32/dit", *extra, "--out", "e.png"]) == 2
        err = capsys.readouterr().err
        assert "emoji32/dit is not a zoo checkpoint (no config.json)" in err and "model section is fixed" not in err
        assert "for the shipped recipe give emoji32/dit.yaml" in err
    assert main(["sample", "emoji32/dit.yaml", "--set", "model.depth=2", "--n", "1", "--steps", "2",
                 "--out", "e.png", "--device", "cpu"]) == 0
    assert "wrote 1 image (32x32)" in capsys.readouterr().out
    (tmp_path / "mine").mkdir()  # no shipped recipe of that name: no hint
    assert main(["sample", "mine", "--out", "e.png"]) == 2
    assert "for the shipped recipe" not in capsys.readouterr().err


def test_options_the_recipe_can_refuse_are_refused_before_the_weights_load(checkpoint, monkeypatch, capsys, tmp_path):
    """--respacing 1001 and float64 with bf16 were refused only after the weights had loaded (seconds for a
    paper model): the recipe alone says so."""
    import zoo.sample

    def no_load(*args, **kwargs):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(zoo.sample, "model_for", no_load)
    for extra, words in ((["--solver", "ddpm", "--respacing", "1001"], "cannot keep 1001 steps of a section of 1000 "
                          "(1000 training steps in 1 section) (keep at most 1000)"),
                         # the hints named 1001 and 1, refused as well
                         (["--solver", "ddim", "--respacing", "ddim1001"], "(keep at most 1000 ('ddim1000' keeps"),
                         (["--solver", "ddim", "--respacing", "ddim1"], "(keep 2 or more steps, or use the ddim_grid solver"),
                         (["--solver", "ddim", "--respacing", "ddim300"], "(use 300 (evenly spaced with a fractional"),
                         (["--steps", "1", "--solver", "ddim"], "is mostly signal"),
                         # a count was said as "respacing '1001'", naming no option
                         (["--steps", "1001", "--solver", "ddpm"], "zoo: error: --steps 1001: key sample.solver.steps: "
                          "1001 steps are more than the schedule's 1000 training steps"),
                         (["--dtype", "float64", "--precision", "bf16"], "a float64 model samples in float64"),
                         (["--class", "99"], "class label 99 (--class) is not a class of this model"),
                         # a label list of another length than --n was refused only after the weights had loaded
                         (["--class", "1,2", "--n", "5"], "the class labels (--class) give 2 samples but n = 5"),

                         (["--cfg", "5000"], "5000")):
        assert main(["sample", str(checkpoint), "--out", str(tmp_path / "x.png"), *extra]) == 2
        assert words in capsys.readouterr().err


def test_progress_is_told_after_every_model_call():
    model, recipe = _trained_like(PIXELS)
    calls = []
    sample_latents(model, recipe, SampleRequest(n=3, batch_size=2, steps=4, solver="ddim", cfg=2.0), progress=calls.append)
    assert calls == [1] * 8  # 4 steps x 2 batches; the guided pair is one batched call


def _png(path):
    with Image.open(path) as im:
        return im.size, im.mode


def test_cli_writes_the_grid(checkpoint, tmp_path, capsys):
    out = tmp_path / "grid.png"
    status = main(["sample", str(checkpoint), "--n", "5", "--steps", "3", "--cfg", "2.0", "--seed", "1",
                   "--batch-size", "2", "--out", str(out), "--device", "cpu"])
    assert status == 0
    stdout = capsys.readouterr().out
    assert "dit convention" in stdout and "w=2" in stdout and "ema weights" in stdout
    # make_grid: ⌈√5⌉ = 3 columns, 2 rows of 8 px tiles with 2 px padding
    assert _png(out) == ((3 * (8 + 2) + 2, 2 * (8 + 2) + 2), "RGB")
    first = out.read_bytes()
    assert main(["sample", str(checkpoint), "--n", "5", "--steps", "3", "--cfg", "2.0", "--seed", "1",
                 "--batch-size", "5", "--out", str(out), "--device", "cpu"]) == 0
    assert out.read_bytes() == first  # 8-bit pixels: identical whatever the batch size
    assert not list(tmp_path.glob(".*tmp*"))  # written atomically, no leftovers


def test_out_inside_a_checkpoint_directory_is_refused(checkpoint, capsys):
    """A grid written into a checkpoint made every later save of it fail (also Ctrl-C's save of last/)."""
    before = sorted(p.name for p in checkpoint.iterdir())
    assert main(["sample", str(checkpoint), "--n", "1", "--steps", "1", "--out", str(checkpoint / "grid.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--out {checkpoint / 'grid.png'} is inside the checkpoint directory" in err
    assert sorted(p.name for p in checkpoint.iterdir()) == before


@pytest.mark.parametrize("command", [
    lambda ckpt, out: ["export", "diffusers", str(ckpt), "--out", str(out)],
    lambda ckpt, out: ["prepare-latents", str(ckpt.parent / "no-images"), "--vae", str(ckpt.parent / "no-vae"),
                       "--out", str(out)],
    lambda ckpt, out: ["train-classifier", "emoji32", "--out", str(out)],
], ids=["export", "prepare-latents", "train-classifier"])
def test_other_writers_refuse_an_out_inside_a_checkpoint_too(checkpoint, capsys, command):
    before = sorted(p.name for p in checkpoint.iterdir())
    assert main(command(checkpoint, checkpoint / "sub")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--out {checkpoint / 'sub'} is inside the checkpoint directory" in err, err
    assert sorted(p.name for p in checkpoint.iterdir()) == before


def test_cli_from_a_recipe_warns_and_errors_are_one_line(tmp_path, capsys, checkpoint):
    out = tmp_path / "r.png"
    assert main(["sample", str(PIXELS), "--n", "2", "--steps", "2", "--out", str(out), "--device", "cpu",
                 "--solver", "ddim", "--set", "sample.cfg.scale=1.0"]) == 0
    captured = capsys.readouterr()
    assert "NO weights" in captured.err and "no classifier-free guidance" in captured.out
    assert "'type': 'ddim'" in captured.out
    assert _png(out)[0] == (2 * (8 + 2) + 2, 8 + 2 + 2)
    assert main(["sample", str(LATENT), "--n", "1", "--steps", "2", "--out", str(out), "--device", "cpu"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("zoo: error")]
    assert len(errors) == 1 and "--vae" in errors[0]
    assert main(["sample", str(checkpoint), "--set", "model.depth=3", "--out", str(out)]) == 2
    assert "checkpoint" in capsys.readouterr().err
    assert main(["sample", str(PIXELS), "--set", "sample.cfg.convention=uvt", "--out", str(out)]) == 2
    assert "did you mean uvit" in capsys.readouterr().err
    assert main(["sample", str(tmp_path / "missing.yaml"), "--out", str(out)]) == 2


def test_weights_that_cannot_fit_are_refused_before_they_are_allocated(monkeypatch, checkpoint):
    """zoo sample built the weights first: an allocator traceback, or the OOM killer on a large enough model."""
    import zoo.memory

    monkeypatch.setattr(zoo.memory, "available_bytes", lambda device: 1000)  # 1000 bytes free
    for source in (PIXELS, checkpoint):  # a recipe's fresh model and a checkpoint's
        with pytest.raises(UserError, match=r"parameters need 0.2 MiB of weights but the cpu device has 0.0 MiB free"):
            load_model(source)


def test_samples_that_are_not_finite_are_not_written(tmp_path, capsys):
    """A NaN image saved as black with exit 0. Finite weights near float32's largest value overflow the samples
    (NaN weights are refused when loaded, before any sample is drawn)."""
    from zoo.cli import main

    model, recipe = _trained_like(PIXELS)
    with torch.no_grad():
        model.final_layer.linear.bias.fill_(3e38)
    save_checkpoint(tmp_path / "ckpt", model, recipe, ema=model)
    assert main(["sample", str(tmp_path / "ckpt"), "--n", "2", "--out", str(tmp_path / "g.png")]) == 2
    assert "2 of the 2 samples hold NaN or inf" in capsys.readouterr().err and not (tmp_path / "g.png").exists()



def _fp16_overflowing(model):
    """``model`` with each MLP's hidden activations 3e5 times larger and its output weights 3e5 times smaller:
    the same function in float32, while fp16 (largest value 65504) overflows between the two layers."""
    with torch.no_grad():
        for block in model.blocks:
            block.mlp.fc1.weight.mul_(3e5)
            block.mlp.fc1.bias.mul_(3e5)
            block.mlp.fc2.weight.div_(3e5)
    return model


def test_samples_that_overflow_fp16_name_fp16_and_another_precision_first(tmp_path, capsys):
    """Weights that sample fine in fp32 gave NaN under --precision fp16, and the message blamed the weights or
    the solver: fp16's range is the cause, and bf16 or fp32 the fix."""
    from zoo.cli import main

    model, recipe = _trained_like(PIXELS)
    save_checkpoint(tmp_path / "ckpt", _fp16_overflowing(model), recipe, ema=model)
    args = ["sample", str(tmp_path / "ckpt"), "--n", "2", "--steps", "2", "--solver", "ddim", "--cfg", "1"]
    assert main([*args, "--precision", "fp32", "--out", str(tmp_path / "fp32.png")]) == 0
    capsys.readouterr()
    assert main([*args, "--precision", "fp16", "--out", str(tmp_path / "g.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "2 of the 2 samples hold NaN or inf (sampled at precision fp16, whose " in err
    assert "g.png not written (sample with --precision bf16 or fp32; if still not finite, check the weights" in err
    assert not (tmp_path / "g.png").exists()

def test_missing_vae_directory_is_a_user_error(tmp_path):
    from zoo.vae import find_vae_weights

    with pytest.raises(UserError, match="does not exist.*never downloads"):
        find_vae_weights(tmp_path / "nope")
    with pytest.raises(UserError, match="no VAE weights"):
        find_vae_weights(tmp_path)
    with pytest.raises(UserError, match="--vae DIR to zoo prepare-latents, sample and eval, data.vae in a recipe"):
        find_vae_weights(None)
    (tmp_path / "config.json").write_text("{}")  # the diffusers folder's config, given for the folder
    with pytest.raises(UserError, match=rf"config.json is a config file, not VAE weights \(give the folder that "
                       rf"holds it and the weights, {re.escape(str(tmp_path))}\)"):
        find_vae_weights(tmp_path / "config.json")


def test_a_vae_folder_with_several_weight_files_takes_the_ema_one_or_asks(tmp_path):
    from zoo.vae import find_vae_weights

    for name in ("autoencoder_kl.pth", "autoencoder_kl_ema.pth"):  # U-ViT's assets/stable-diffusion/
        (tmp_path / name).write_bytes(b"")
    assert find_vae_weights(tmp_path) == tmp_path / "autoencoder_kl_ema.pth"
    (tmp_path / "other_ema.ckpt").write_bytes(b"")
    with pytest.raises(UserError, match=r"several weight files \(autoencoder_kl.pth, autoencoder_kl_ema.pth, "
                                        r"other_ema.ckpt\) \(give the file itself"):
        find_vae_weights(tmp_path)
    assert find_vae_weights(tmp_path / "other_ema.ckpt") == tmp_path / "other_ema.ckpt"


def test_data_vae_file_picks_the_file_of_a_vae_folder_holding_several(tmp_path):
    """U-ViT's assets/stable-diffusion/ holds both decoders: U-ViT-L/2 decodes with autoencoder_kl.pth, and
    the folder gave every recipe the _ema one."""
    from zoo.vae import find_vae_weights

    for name in ("autoencoder_kl.pth", "autoencoder_kl_ema.pth"):
        (tmp_path / name).write_bytes(b"")
    assert find_vae_weights(tmp_path, name="autoencoder_kl.pth") == tmp_path / "autoencoder_kl.pth"
    assert find_vae_weights(tmp_path, name=None) == tmp_path / "autoencoder_kl_ema.pth"  # unset: as before
    assert find_vae_weights(tmp_path / "autoencoder_kl_ema.pth", name="autoencoder_kl.pth") == \
        tmp_path / "autoencoder_kl_ema.pth"  # a file given itself is the one used
    with pytest.raises(UserError, match=rf"^VAE directory {re.escape(str(tmp_path))} holds no other.pth \(the "
                       r"recipe's data.vae_file\), only autoencoder_kl.pth, autoencoder_kl_ema.pth \(put other.pth "
                       rf"there, or give the file to decode with itself: --vae {re.escape(str(tmp_path))}/"):
        find_vae_weights(tmp_path, name="other.pth")
    for path in ("../other/autoencoder_kl.pth", "/elsewhere/autoencoder_kl.pth", ".."):  # read another folder's
        with pytest.raises(UserError, match=rf"^data.vae_file '{re.escape(path)}' is not a file name: it names a "
                           "file inside the VAE folder"):
            find_vae_weights(tmp_path, name=path)
    (tmp_path / "autoencoder_kl.pth").unlink()  # one file: nothing to choose between
    assert find_vae_weights(tmp_path, name="other.pth") == tmp_path / "autoencoder_kl_ema.pth"


@pytest.mark.parametrize("recipe, expected", [("uvit_l_2", "autoencoder_kl.pth"), ("uvit_h_2", "autoencoder_kl_ema.pth"),
                                              ("dimr_xl_2r", "autoencoder_kl_ema.pth")])
def test_each_paper_recipe_decodes_with_its_official_file_of_uvits_vae_folder(tmp_path, recipe, expected):
    """imagenet256_uvit.py (U-ViT-L/2) names autoencoder_kl.pth; U-ViT-H and DiMR name the _ema one."""
    from zoo.sample import vae_weights

    for name in ("autoencoder_kl.pth", "autoencoder_kl_ema.pth"):
        (tmp_path / name).write_bytes(b"")
    loaded = zoo.load_recipe(Path(__file__).parents[1] / "recipes" / f"{recipe}.yaml")
    assert vae_weights(loaded, tmp_path) == tmp_path / expected
    assert vae_weights({**loaded, "data": {**loaded["data"], "vae": str(tmp_path)}}, None) == tmp_path / expected


def test_a_vae_file_the_folder_lacks_is_one_line_exit_2(tmp_path, capsys):
    vae = tmp_path / "vae"
    vae.mkdir()
    for name in ("autoencoder_kl_ema.pth", "other.pth"):
        (vae / name).write_bytes(b"")
    assert main(["sample", str(LATENT), "--n", "1", "--steps", "2", "--vae", str(vae), "--device", "cpu",
                 "--set", "data.vae_file=autoencoder_kl.pth", "--out", str(tmp_path / "g.png")]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("zoo: error")]
    assert errors == [f"zoo: error: VAE directory {vae} holds no autoencoder_kl.pth (the recipe's data.vae_file), "
                      f"only autoencoder_kl_ema.pth, other.pth (put autoencoder_kl.pth there, or give the file to "
                      f"decode with itself: --vae {vae / 'autoencoder_kl_ema.pth'})"]
    assert "Traceback" not in err and not (tmp_path / "g.png").exists()


@pytest.fixture(scope="module")
def random_vae_dir(tmp_path_factory):
    from safetensors.torch import save_file

    from zoo.vae import build_sd_vae

    torch.manual_seed(0)
    vae = build_sd_vae()
    path = tmp_path_factory.mktemp("vae")
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(path / "diffusion_pytorch_model.safetensors"))
    return path, vae


@pytest.mark.slow
def test_vae_builds_offline_with_sd_parameter_count_and_decodes(random_vae_dir):
    from zoo.vae import SCALE, build_sd_vae, load_vae

    assert sum(p.numel() for p in build_sd_vae("meta").parameters()) == 83_653_863  # SD KL-f8 VAE: 83.65M
    path, reference = random_vae_dir
    start = time.perf_counter()
    codec = load_vae(path, chunk_size=1)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    images = codec.decode(z)
    assert images.shape == (2, 3, 64, 64) and images.abs().max() <= 1
    with torch.no_grad():
        expected = reference.decode(z / SCALE).sample.clamp(-1, 1)
    assert torch.allclose(images, expected, atol=1e-4)  # chunked decode = one batch (conv rounding ~1e-5)
    assert time.perf_counter() - start < 120


def _to_ldm_layout(state):
    """diffusers' AutoencoderKL names → the LDM / U-ViT ``autoencoder_kl*.pth`` names (written from the LDM layout)."""
    import re

    out = {}
    for key, value in state.items():
        k = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        k = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", k)
        k = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", k)
        k = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{3 - int(m[1])}.block.", k)
        k = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"decoder.up.{3 - int(m[1])}.upsample.", k)
        k = re.sub(r"mid_block\.resnets\.(\d)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", k)
        attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
        for new, old in attn.items():
            k = k.replace(f"mid_block.attentions.0.{new}.", f"mid.attn_1.{old}.")
        if ".attn_1." in k and k.endswith("weight") and value.ndim == 2:
            value = value[:, :, None, None]  # LDM's attention projections are 1x1 convolutions
        out[k] = value
    return out


@pytest.mark.slow
def test_vae_reads_ldm_layout_weights(random_vae_dir, tmp_path):
    """U-ViT/DiMR ship the SD VAE as an LDM-layout ``autoencoder_kl_ema.pth``: it loads to the same decoder."""
    from zoo.vae import SCALE, load_vae

    _, reference = random_vae_dir
    ldm = _to_ldm_layout(reference.state_dict())
    assert "decoder.up.0.block.0.conv1.weight" in ldm and "encoder.mid.attn_1.q.weight" in ldm
    torch.save(ldm, tmp_path / "autoencoder_kl_ema.pth")
    codec = load_vae(tmp_path)
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference.decode(z / SCALE).sample.clamp(-1, 1)
    assert torch.allclose(codec.decode(z), expected, atol=1e-5)


@pytest.mark.slow
def test_cli_decodes_latents_through_the_vae(random_vae_dir, tmp_path):
    model, recipe = _trained_like(LATENT)
    ckpt = tmp_path / "latent"
    save_checkpoint(ckpt, model, recipe)
    out = tmp_path / "latent.png"
    assert main(["sample", str(ckpt), "--n", "2", "--steps", "2", "--vae", str(random_vae_dir[0]),
                 "--out", str(out), "--device", "cpu"]) == 0
    assert _png(out) == ((2 * (64 + 2) + 2, 64 + 2 + 2), "RGB")


def test_bad_vae_weights_fail_before_any_sampling(tmp_path, monkeypatch, capsys):
    from safetensors.torch import save_file

    model, recipe = _trained_like(LATENT)
    save_checkpoint(tmp_path / "latent", model, recipe)
    (tmp_path / "notavae").mkdir()
    save_file({"x": torch.zeros(1)}, str(tmp_path / "notavae" / "diffusion_pytorch_model.safetensors"))
    monkeypatch.setattr("zoo.sample.sample_latents", lambda *a, **k: pytest.fail("sampled before the VAE was read"))
    assert main(["sample", str(tmp_path / "latent"), "--n", "2", "--steps", "2", "--vae", str(tmp_path / "notavae"),
                 "--out", str(tmp_path / "x.png"), "--device", "cpu"]) == 2
    assert "notavae" in capsys.readouterr().err


def test_vae_weights_checks_a_safetensors_headers_keys_before_any_sampling(tmp_path):
    """data.vae naming a zoo checkpoint (its ema.safetensors is the file found): vae_weights, the check run
    before sampling (zoo train's start, zoo sample's and eval's load), refuses it by its header, naming the
    caller's option; finding the file alone passed it, and zoo train warned at every grid instead."""
    from safetensors.torch import save_file

    from zoo.options import TRAIN_OPTIONS
    from zoo.sample import vae_weights

    (tmp_path / "ckpt").mkdir()
    save_file({"blocks.0.attn.qkv.weight": torch.zeros(2, 2)}, str(tmp_path / "ckpt" / "ema.safetensors"))
    recipe = zoo.load_recipe(LATENT)
    recipe["data"]["vae"] = str(tmp_path / "ckpt")
    with pytest.raises(UserError, match=r"ema.safetensors \(the VAE: data.vae\) does not match the model"):
        vae_weights(recipe, None, TRAIN_OPTIONS)
    with pytest.raises(UserError, match=r"ema.safetensors \(the VAE: --vae, or data.vae in a recipe\) does not"):
        vae_weights(recipe, None)


def test_zoo_trains_vae_of_other_weights_read_at_load_names_data_vae_not_the_vae_flag(tmp_path):
    """A .bin or .ckpt has no header to check up front: load_vae reads it when the decoder is loaded. Without
    the caller's options passed on, zoo train's grid warning named '--vae, or data.vae in a recipe', a flag
    zoo train refuses; zoo sample's keeps naming its flag."""
    from zoo.options import TRAIN_OPTIONS
    from zoo.sample import load_decoder

    for suffix in (".bin", ".ckpt"):
        folder = tmp_path / suffix[1:]
        folder.mkdir()
        torch.save({"blocks.0.attn.qkv.weight": torch.zeros(2, 2)}, folder / f"other{suffix}")
        recipe = zoo.load_recipe(LATENT)
        recipe["data"]["vae"] = str(folder)
        with pytest.raises(UserError, match=rf"other\{suffix} \(the VAE: data.vae\) does not match the model") as err:
            load_decoder(recipe, None, "cpu", TRAIN_OPTIONS)
        assert "(the VAE: --vae" not in str(err.value)  # (the advice lists every command's way to give it)
        with pytest.raises(UserError, match=r"\(the VAE: --vae, or data.vae in a recipe\) does not match"):
            load_decoder(recipe, None, "cpu")


def test_a_weights_file_inside_a_checkpoint_points_at_its_directory(checkpoint, tmp_path, capsys):
    assert main(["sample", str(checkpoint / "ema.safetensors"), "--n", "1", "--out", str(tmp_path / "s.png")]) == 2
    assert f"(give the checkpoint directory {checkpoint})" in capsys.readouterr().err


def test_grid_matches_torchvision_layout(tmp_path):
    from torchvision.utils import make_grid

    from zoo.sample import image_grid, save_grid

    images = torch.rand(10, 3, 4, 5)
    cols = math.ceil(math.sqrt(10))
    assert torch.equal(image_grid(images, cols), make_grid(images, nrow=cols, padding=2, pad_value=1.0))
    save_grid(images, tmp_path / "g.png")
    assert _png(tmp_path / "g.png") == ((cols * 7 + 2, math.ceil(10 / cols) * 6 + 2), "RGB")
    with Image.open(tmp_path / "g.png") as im:
        pixels = torch.from_numpy(__import__("numpy").asarray(im).copy()).permute(2, 0, 1)
    expected = (image_grid(images, cols) * 255 + 0.5).clamp(0, 255).to(torch.uint8)
    assert torch.equal(pixels, expected)  # torchvision's save_image rounding


@pytest.mark.parametrize("channels", [2, 4, 5])
def test_a_grid_of_other_than_one_or_three_channels_shows_each_channel_as_a_grey_tile(tmp_path, channels):
    """Four channels were written as RGBA (the fourth drawn as transparency), five failed in PIL."""
    from zoo.sample import image_grid, save_grid

    images = torch.rand(3, channels, 4, 5)
    save_grid(images, tmp_path / "g.png")  # 3 samples: 2 per row, each a row of its channels
    assert _png(tmp_path / "g.png") == ((2 * channels * 7 + 2, 2 * 6 + 2), "L")
    with Image.open(tmp_path / "g.png") as im:
        pixels = torch.from_numpy(__import__("numpy").asarray(im).copy())
    tiles = image_grid(images.reshape(3 * channels, 1, 4, 5), 2 * channels)[0]
    assert torch.equal(pixels, (tiles * 255 + 0.5).clamp(0, 255).to(torch.uint8))
    second_sample_last_channel = pixels[2:6, 2 + (2 * channels - 1) * 7: 2 + (2 * channels - 1) * 7 + 5]
    assert torch.equal(second_sample_last_channel, (images[1, -1] * 255 + 0.5).to(torch.uint8))


def test_a_vae_for_a_pixel_model_is_refused_not_ignored(tmp_path, capsys):
    recipe = Path(__file__).parent / "recipes" / "tiny_train.yaml"
    argv = ["sample", str(recipe), "--n", "2", "--steps", "2", "--out", str(tmp_path / "g.png")]
    assert main(argv + ["--vae", str(tmp_path)]) == 2
    assert capsys.readouterr().err.endswith(f"zoo: error: --vae {tmp_path}: this model samples pixels (its recipe's "
                                            "data are images, not latents), so there is nothing to decode (drop --vae)\n")
    assert not (tmp_path / "g.png").exists() and main(argv) == 0


@pytest.mark.parametrize("flags, expected", [
    (["--steps", "0"], "zoo: error: --steps 0: key sample.solver.steps: steps must be a positive integer"),
    (["--solver", "bogus"], "zoo: error: --solver bogus: key sample.solver.type: unknown solver 'bogus'"),
    (["--solver", "dpm_solver++", "--respacing", "10,15"], "(--respacing walks ADM's respaced chain: solvers ddpm and "
     "ddim)"),
    # found at the first model call, in Python-API words ("needs eps_fn to return (eps, v)")
    (["--solver", "ddpm", "--set", "sample.solver.variance=learned"], "key sample.solver.variance: ddpm variance "
     "'learned' reads the model's variance output, and this model has none (model.learn_sigma is false)"),
])
def test_a_bad_solver_option_names_the_option_not_an_internal_spec(tmp_path, capsys, flags, expected):
    """The messages began '<solver spec>: key steps:', naming no option the user typed."""
    recipe = Path(__file__).parent / "recipes" / "tiny_train.yaml"
    assert main(["sample", str(recipe), "--n", "2", "--out", str(tmp_path / "g.png"), *flags]) == 2
    err = capsys.readouterr().err
    assert expected in err and "<solver spec>" not in err


def test_an_n_whose_grid_cannot_fit_in_memory_is_refused_before_sampling(tmp_path, capsys, monkeypatch):
    """Every sample is kept and tiled into one PNG: --n 100000000 sampled on until the OOM killer came."""
    from zoo import memory

    monkeypatch.setattr(memory, "available_bytes", lambda device: 1 << 20)  # 1 MiB free, whatever the machine
    recipe = Path(__file__).parent / "recipes" / "tiny_train.yaml"
    assert main(["sample", str(recipe), "--n", "1000", "--out", str(tmp_path / "g.png")]) == 2
    assert ("zoo: error: --n 1000 images of 8x8 need about 2 MiB of memory for one grid, and 1 MiB is free "
            "(use --n 455 or less)") in capsys.readouterr().err


def test_the_checks_before_the_weights_draw_no_labels(monkeypatch, capsys, tmp_path):
    """The early label check drew every sample's random class (a generator each) before the grid's memory
    was checked: --n 100000000 ran ~40 min to its one-line refusal. Given labels are still checked early."""
    import zoo.sample as sampling

    def no_draws(*args, **kwargs):
        raise AssertionError("labels drawn before sampling")

    monkeypatch.setattr(sampling, "sample_labels", no_draws)
    recipe = zoo.load_recipe(Path(__file__).parent / "recipes" / "tiny_train.yaml")
    sampling.check_before_weights(recipe, None, None, None, None, None, request=SampleRequest(n=10**8))
    with pytest.raises(UserError, match=r"class label 9 \(--class\) is not a class of this model \(0..3\)"):
        sampling.check_before_weights(recipe, None, None, None, None, None,
                                      request=SampleRequest(n=10**8, class_labels=[9]))


def test_guided_eps_fn_is_called_as_sampling_md_writes_it():
    """docs/sampling.md names guided_eps_fn(model, recipe, schedule, y, guidance); it needed a sixth argument."""
    from zoo.diffusion.setup import build_schedule, guidance_settings, guided_eps_fn

    recipe = zoo.load_recipe(Path(__file__).parent / "recipes" / "tiny_train.yaml")
    model = zoo.build_model(recipe).eval().double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))  # off adaLN-Zero's zero init, which outputs 0 whatever the scale
    schedule, y = build_schedule(recipe), torch.tensor([1, 2])
    x, t = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.tensor([0.5, 0.9], dtype=torch.float64)
    documented = guided_eps_fn(model, recipe, schedule, y, guidance_settings(recipe))
    explicit = guided_eps_fn(model, recipe, schedule, y, guidance_settings(recipe), eps_channels=3)
    assert torch.equal(documented(x, t), explicit(x, t))
    # a scale alone (it raised AttributeError: 'float' object has no attribute 'active')
    by_scale = guided_eps_fn(model, recipe, schedule, y, 2.5)
    assert torch.equal(by_scale(x, t), guided_eps_fn(model, recipe, schedule, y, guidance_settings(recipe, 2.5))(x, t))
    assert not torch.equal(by_scale(x, t), documented(x, t))  # the recipe's own scale is another
    for wrong in (None, True, "1.5"):  # an AttributeError on .active
        with pytest.raises(UserError, match=r"^guidance is a GuidanceSettings or a number \(the scale\), got"):
            guided_eps_fn(model, recipe, schedule, y, wrong)


@pytest.mark.parametrize("fields, said", [
    ({"class_labels": []}, "class_labels is empty"),  # it reached the model: "DiT takes y as 2 integer labels"
    ({"n": 2.0}, "SampleRequest.n must be an integer, got 2.0"),  # range() raised a TypeError
    ({"batch_size": 1.5}, "SampleRequest.batch_size must be an integer, got 1.5"),
    ({"seed": 1.5}, "SampleRequest.seed must be an integer, got 1.5"),  # seed 1's images, silently
])
def test_a_sample_request_of_the_wrong_kind_is_named(fields, said):
    with pytest.raises(UserError, match=re.escape(said)):
        SampleRequest(**{"n": 2, **fields}).count()


def test_zoo_sample_under_torchrun_is_one_line_pointing_to_zoo_eval(monkeypatch, capsys):
    """Under torchrun every process sampled the whole grid and wrote the same file."""
    import zoo.cli

    monkeypatch.setattr(zoo.cli, "QUIET_RANK_WAIT_S", 0.0)  # the wait for rank 0's line under torchrun
    for rank, expected in (("0", "zoo: error: zoo sample runs in one process"), ("1", "")):
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", rank)
        assert main(["sample", "dit_s_2", "--steps", "2"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(expected) and err.count("\n") == (rank == "0")
        if rank == "0":
            assert err.rstrip().endswith("torchrun ... -m zoo eval CHECKPOINT --num-samples N)")


def test_the_solver_line_names_the_steps_a_switched_solver_takes(checkpoint, tmp_path, capsys):
    """--solver ddpm drops the recipe's steps (another solver's options); the line read "solver {'type': 'ddpm'}",
    leaving the user to wonder why sampling took five times as long."""
    assert main(["sample", str(checkpoint), "--n", "1", "--solver", "euler", "--out", str(tmp_path / "a.png")]) == 0
    assert "zoo sample: solver {'type': 'euler'} (50 steps, its default);" in capsys.readouterr().out
    assert main(["sample", str(checkpoint), "--n", "1", "--solver", "euler", "--steps", "3",
                 "--out", str(tmp_path / "b.png")]) == 0
    assert "zoo sample: solver {'type': 'euler', 'steps': 3};" in capsys.readouterr().out
    # adaptive solvers have no step count: it said "(1 steps, its default)" for ode's dopri5
    assert main(["sample", str(checkpoint), "--n", "1", "--solver", "ode", "--out", str(tmp_path / "c.png")]) == 0
    assert "zoo sample: solver {'type': 'ode'} (adaptive: rtol and atol set its steps);" in capsys.readouterr().out


def test_an_out_that_cannot_be_written_is_refused_before_sampling(tmp_path, capsys, monkeypatch):
    """A read-only output directory ran the whole sampler, then stopped with 'read-only'."""
    import errno

    import zoo.guards
    import zoo.sample

    monkeypatch.setattr(zoo.sample, "sample_latents", lambda *a, **k: pytest.fail("it sampled"))
    (tmp_path / "afile.txt").write_text("keep")
    assert main(["sample", str(PIXELS), "--n", "1", "--out", str(tmp_path / "afile.txt" / "g.png")]) == 2
    assert f"{tmp_path / 'afile.txt'} is a file, not a directory" in capsys.readouterr().err

    def read_only(directory):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(zoo.guards, "_probe", read_only)
    assert main(["sample", str(PIXELS), "--n", "1", "--out", str(tmp_path / "ro" / "g.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--out {tmp_path / 'ro' / 'g.png'}: cannot write in {tmp_path} (Read-only" in err


def test_the_weights_memory_check_counts_a_widening_cast_whole():
    """--dtype float64 was checked at 8 bytes a weight; the loaded float32 weights and their float64 copy are
    both alive during the cast (a DiT-L/2 peaked at 12)."""
    from zoo.sample import _bytes_per_param

    assert [_bytes_per_param(d) for d in (None, torch.float32, torch.bfloat16, torch.float64)] == [4, 4, 4, 12]


def test_sampling_a_recipe_is_reproducible_and_starts_from_zoo_trains_initial_weights(tmp_path, capsys):
    """zoo sample RECIPE drew its random weights from the unseeded global generator: two runs with --seed 0 gave
    two different grids (a DiT's zero-initialised head hid it; a DiMR shows it). The weights are now those
    zoo train starts from (torch.manual_seed(train.seed), then the build), and sample.seed is --seed's default."""
    from zoo.sample import model_for

    recipe = zoo.load_recipe(DIMR, ["train.seed=5"])
    torch.manual_seed(0)
    model, _ = model_for(DIMR, recipe)
    after = torch.randn(2)
    torch.manual_seed(5)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), zoo.build_model(recipe).state_dict().values()))
    torch.manual_seed(0)
    assert torch.equal(after, torch.randn(2))  # the caller's random state is untouched
    grids = []
    for i, extra in enumerate((["--seed", "4"], ["--seed", "4"], ["--set", "sample.seed=4"], [])):
        out = tmp_path / f"g{i}.png"
        assert main(["sample", str(DIMR), "--n", "2", "--steps", "2", "--out", str(out), "--device", "cpu", *extra]) == 0
        grids.append(np.asarray(Image.open(out)))
    capsys.readouterr()
    assert np.array_equal(grids[0], grids[1]) and np.array_equal(grids[0], grids[2])
    assert not np.array_equal(grids[0], grids[3])  # seed 0, the default without sample.seed


def test_a_python_request_without_a_seed_takes_the_recipes_sample_seed():
    """SampleRequest.seed defaulted to 0, so sample_latents ignored sample.seed, which zoo sample and zoo eval read."""
    model, recipe = _trained_like(PIXELS)
    seeded = {**recipe, "sample": {**recipe["sample"], "seed": 4}}
    by_recipe, _ = sample_latents(model, seeded, SampleRequest(n=2, steps=2))
    assert torch.equal(by_recipe, sample_latents(model, recipe, SampleRequest(n=2, steps=2, seed=4))[0])
    assert not torch.equal(by_recipe, sample_latents(model, recipe, SampleRequest(n=2, steps=2))[0])  # seed 0


def test_a_checkpoint_whose_recorded_solver_is_not_installed_samples_with_another(tmp_path, capsys):
    """A run trained with a plugin's solver in its sample section could not be sampled where that plugin is
    gone, even with --solver or --set sample.solver naming a built-in one: its recorded recipe was
    validated whole before the model was built (the model section alone builds the weights)."""
    import json

    recipe = zoo.load_recipe(RECIPES / "tiny_train.yaml")
    save_checkpoint(tmp_path / "ckpt", zoo.build_model(recipe), recipe)
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    config["recipe"]["sample"]["solver"] = {"type": "uninstalled_solver", "steps": 3}
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    for flags in (["--solver", "ddim", "--steps", "3"], ["--set", "sample.solver={type: ddim, steps: 3}"]):
        assert main(["sample", str(tmp_path / "ckpt"), "--n", "2", "--out", str(tmp_path / "s.png"), *flags]) == 0
        assert "solver {'type': 'ddim', 'steps': 3}" in capsys.readouterr().out
    assert main(["sample", str(tmp_path / "ckpt"), "--n", "2", "--out", str(tmp_path / "s.png")]) == 2
    err = capsys.readouterr().err
    assert "key sample.solver.type: unknown solver 'uninstalled_solver'" in err
    assert err.rstrip().endswith("(sample with one of the known solvers: --solver NAME)")  # what to do now


def test_the_known_solvers_hint_is_for_a_recorded_solver_not_installed_only(tmp_path, capsys, checkpoint):
    """zoo sample and zoo eval added "sample with one of the known solvers" to any sample.solver error, the
    user's own --set mistakes included; and --solver on such a checkpoint was named as a --set never typed."""
    import json

    hint = "known solvers: --solver NAME"
    out = ["--n", "2", "--out", str(tmp_path / "s.png")]
    for flags in (["--set", "sample.solver.steps=0"], ["--set", "sample.solver.nosuchkey=1"],
                  ["--set", "sample.solver=nosuch3"]):
        for command in (["sample", str(checkpoint), *out], ["eval", str(checkpoint), "--n", "2", "--ref", "synthetic",
                                                           "--out", str(tmp_path / "ev")]):
            assert main([*command, *flags]) == 2
            err = capsys.readouterr().err
            assert f"{flags[1]}: key sample.solver" in err and hint not in err, err
    recipe = zoo.load_recipe(RECIPES / "tiny_train.yaml")
    save_checkpoint(tmp_path / "ckpt", zoo.build_model(recipe), recipe)
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    config["recipe"]["sample"]["solver"] = {"type": "uninstalled_solver", "steps": 3}
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    for ckpt in (checkpoint, tmp_path / "ckpt"):
        assert main(["sample", str(ckpt), *out, "--solver", "nosuch2"]) == 2
        assert "error: --solver nosuch2: key sample.solver.type: unknown solver 'nosuch2'" in capsys.readouterr().err
    assert main(["sample", str(tmp_path / "ckpt"), *out, "--set", "sample.solver=nosuch3"]) == 2
    assert hint not in capsys.readouterr().err
