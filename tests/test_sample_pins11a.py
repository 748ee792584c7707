"""Pins on zoo.sample that mutation testing (round 11a) found unheld: an explicit seed 0 is seed 0, not the
recipe's; a request for no samples or with a bool for a count/seed is refused; data classes beyond the model's
table and given noise of the wrong shape are refused before the model runs; one non-finite value refuses a
sample; a float64 model takes --precision fp32; --vae beats data.vae and data.vae_scale reaches the decoder;
the recorded class names beat the folders; load_model casts to the dtype asked for; --steps/--respacing
replace each other; a grid whose write fails leaves the previous one whole. Each was a one-line change to
zoo/sample.py that the suite let through; the tests use the tiny pixel DiT and run in well under a second."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import zoo
from zoo.errors import UserError
from zoo.sample import SampleRequest, sample_latents
from zoo.seeds import recipe_seed

pytestmark = pytest.mark.usefixtures("one_thread")

PIXELS = Path(__file__).parent / "recipes" / "tiny_dit_pixels.yaml"


def _tiny(seed: int = 0):
    """The tiny pixel DiT with every weight nudged off its zero init (float64)."""
    recipe = zoo.load_recipe(PIXELS)
    model = zoo.build_model(recipe)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return model.double().eval(), recipe


def test_an_explicit_seed_0_is_seed_0_not_the_recipes():
    """--seed 0 (SampleRequest(seed=0)) draws seed 0's images; a falsy-seed test (``seed or sample.seed``)
    drew the recipe's sample.seed instead, so seed 0 could not be asked for on such a recipe."""
    assert recipe_seed({"sample": {"seed": 5}}, 0) == 0
    assert recipe_seed({"sample": {"seed": 5}}, None) == 5 and recipe_seed({}, None) == 0
    model, recipe = _tiny()
    seeded = {**recipe, "sample": {**recipe["sample"], "seed": 5}}
    request = dict(n=2, steps=2, class_labels=1)
    zero, _ = sample_latents(model, seeded, SampleRequest(seed=0, **request))
    assert torch.equal(zero, sample_latents(model, recipe, SampleRequest(seed=0, **request))[0])
    assert not torch.equal(zero, sample_latents(model, recipe, SampleRequest(seed=5, **request))[0])


def test_a_request_for_no_samples_is_refused():
    """SampleRequest(n=0) is a UserError from count(): taken as 0 it reached range(0, 0, 0) as a
    ValueError (batch size 0) deep in sampling, and a negative n drew nothing without a word."""
    for n in (0, -3):
        with pytest.raises(UserError, match=rf"n \(--n\) must be at least 1, got {n}"):
            SampleRequest(n=n).count()
    assert SampleRequest(n=1).count() == 1


@pytest.mark.parametrize("field", ["n", "seed", "batch_size"])
def test_a_bool_is_no_count_seed_or_batch_size(field):
    """True is an int to Python: SampleRequest(seed=True) drew seed 1's images and n=True one sample,
    where the caller meant a switch; count() refuses bools as it refuses 2.0."""
    with pytest.raises(UserError, match=rf"SampleRequest\.{field} must be an integer, got True"):
        SampleRequest(**{field: True}).count()


def test_data_classes_beyond_the_models_table_are_refused_before_labels_are_drawn():
    """data.num_classes 12 on a model that embeds 10 (no null label): random labels were drawn from 0..11,
    and label 10 or 11 reached the embedding as an IndexError mid-sampling, or sampled another class."""
    model, recipe = _tiny()
    recipe = {**recipe, "model": {**recipe["model"], "class_dropout_prob": 0.0},
              "diffusion": {k: v for k, v in recipe["diffusion"].items() if k not in ("null_label", "label_drop")},
              "data": {**recipe["data"], "num_classes": 12}, "sample": {**recipe["sample"], "cfg": {"scale": 1.0}}}
    recipe = zoo.load_recipe(recipe)  # the recipe alone is valid
    with pytest.raises(UserError, match=r"data\.num_classes is 12, but the model embeds only 10 classes"):
        sample_latents(model, recipe, SampleRequest(n=2, steps=2))


def test_the_vae_option_takes_precedence_over_the_recipes_data_vae(tmp_path):
    """--vae DIR replaces data.vae (as the docstring and zoo sample --help say): a reversed precedence
    decoded with the recipe's VAE and ignored the one the user named."""
    from zoo.sample import vae_weights

    recorded, given = tmp_path / "recorded.safetensors", tmp_path / "given.safetensors"
    recorded.write_bytes(b"x"), given.write_bytes(b"x")
    recipe = {"data": {"latent": True, "vae": str(recorded)}}
    assert vae_weights(recipe, given) == given
    assert vae_weights(recipe, None) == recorded


def test_a_float64_model_takes_precision_fp32_and_ignores_the_recipes():
    """A float64 model samples in float64: --precision fp32 (no lower arithmetic) is accepted for it, a
    lower one refused, and the recipe's own sample.precision left aside; a check that refused fp32 too
    stopped `zoo sample --dtype float64 --precision fp32` parity runs."""
    from zoo.sample import sampling_precision

    recipe = {"sample": {"precision": "bf16"}}
    assert sampling_precision(recipe, "fp32", torch.float64) is None
    assert sampling_precision(recipe, None, torch.float64) is None
    with pytest.raises(UserError, match="a float64 model samples in float64; precision bf16"):
        sampling_precision(recipe, "bf16", torch.float64)
    assert sampling_precision(recipe, None, torch.float32) == "bf16"
    assert sampling_precision(recipe, "fp32", torch.float32) == "fp32"  # given beats the recipe's


def test_given_noise_of_another_sample_shape_is_refused_naming_x_t():
    """x_T of the wrong sample shape is refused before any model call, naming x_T and the shape the model
    samples; without the check only a backbone's own input check caught it (a (B, 3, 8, 8) error about a
    doubled guided batch the caller never built), and a fully convolutional model sampled another size."""
    model, recipe = _tiny()
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    for bad in [(2, 2, 8, 8), (2, 3, 16, 16)]:
        with pytest.raises(UserError, match=rf"x_T has samples of shape \({bad[1]}, {bad[2]}, {bad[3]}\); "
                                            r"this model samples \(3, 8, 8\)"):
            sample_latents(model, recipe, SampleRequest(x_T=torch.randn(bad, dtype=torch.float64), steps=2))
    assert not calls


def test_a_grid_whose_write_fails_leaves_the_previous_grid_whole(tmp_path, monkeypatch):
    """save_grid writes beside the target and renames: a write that fails half way (a full disk, a kill)
    leaves the last good grid, not a truncated PNG that zoo train's next look at samples/ reads as broken."""
    from PIL import Image

    from zoo.sample import save_grid

    path = tmp_path / "grid.png"
    save_grid(torch.full((4, 3, 8, 8), 0.25), path)
    before = path.read_bytes()

    def half_then_fail(self, fp, *args, **kwargs):
        Path(fp).write_bytes(before[:20])
        raise RuntimeError("encoder stopped")

    monkeypatch.setattr(Image.Image, "save", half_then_fail)
    with pytest.raises(RuntimeError, match="encoder stopped"):
        save_grid(torch.full((4, 3, 8, 8), 0.75), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png"]  # no temporary file left


def test_a_sample_with_a_single_non_finite_value_is_refused():
    """One NaN pixel makes a sample unusable (it reads black in the grid and poisons an FD): refuse_non_finite
    counts every sample holding any NaN or inf, not only those that are non-finite throughout."""
    from zoo.sample import refuse_non_finite

    x = torch.zeros(4, 3, 2, 2, dtype=torch.float64)
    refuse_non_finite(x, "4 samples", "nothing written")
    x[1, 2, 0, 1] = float("nan")
    x[3, 0, 1, 1] = float("-inf")
    with pytest.raises(UserError, match=r"^2 of 4 samples hold NaN or inf .*; nothing written"):
        refuse_non_finite(x, "4 samples", "nothing written")


def test_class_names_are_those_the_checkpoint_recorded_not_the_folders_now(tmp_path):
    """A class folder added after training shifts every later label of an image folder: --class NAME resolves
    against the names the checkpoint recorded, where it recorded them, and the folders only otherwise."""
    from zoo.checkpoint import save_checkpoint
    from zoo.sample import label_names

    images = tmp_path / "images"
    for folder in ("cat", "dog"):
        (images / folder).mkdir(parents=True)
    recipe = {"model": {"type": "dit", "input_size": 8, "patch_size": 2, "in_channels": 3, "hidden_size": 32,
                        "depth": 1, "num_heads": 2, "num_classes": 2},
              "data": {"dataset": "image_folder", "root": str(images), "image_size": 8}}
    model = zoo.build_model(recipe)
    out = save_checkpoint(tmp_path / "c", model, recipe, classes=["cat", "dog"])
    (images / "ant").mkdir()  # added since: the folders now say ant, cat, dog
    assert label_names(out, recipe) == ["cat", "dog"]
    assert label_names(save_checkpoint(tmp_path / "old", model, recipe), recipe) == ["ant", "cat", "dog"]


def test_load_model_casts_a_checkpoint_to_the_dtype_asked_for(tmp_path):
    """zoo sample --dtype float64 (parity checks) samples a float64 model: load_model left the float32
    weights as they were, so the 'float64' samples were float32 arithmetic."""
    from zoo.checkpoint import save_checkpoint
    from zoo.sample import load_model

    model, recipe = _tiny()
    out = save_checkpoint(tmp_path / "c", model.float(), recipe)
    loaded, _, origin = load_model(out, dtype=torch.float64)
    assert {p.dtype for p in loaded.parameters()} == {torch.float64} and "model weights" in origin
    assert {p.dtype for p in load_model(out)[0].parameters()} == {torch.float32}


def test_the_decoder_scales_latents_by_the_recipes_vae_scale(tmp_path, monkeypatch):
    """data.vae_scale (latents prepared with another VAE's scaling, e.g. SDXL's 0.13025) is the scale the
    samples are decoded with; the SD default 0.18215 in its place decoded every sample at the wrong scale."""
    import zoo.vae
    from zoo.sample import load_decoder

    weights = tmp_path / "vae.safetensors"
    weights.write_bytes(b"x")
    seen = {}
    monkeypatch.setattr(zoo.vae, "load_vae",
                        lambda path, device="cpu", scale=None, options=None: seen.update(path=path, scale=scale))
    load_decoder({"data": {"latent": True, "vae": str(weights), "vae_scale": 0.13025}}, None)
    assert seen == {"path": weights, "scale": 0.13025}
    load_decoder({"data": {"latent": True, "vae": str(weights)}}, None)
    assert seen["scale"] == zoo.vae.SCALE == 0.18215


def test_steps_replace_a_recipes_respacing_and_respacing_its_steps():
    """--steps and --respacing name the same chain: one given on the command line replaces the recipe's
    other (a ddim recipe with respacing: ddim10 sampled with --steps 4 walks 4 steps, and one with steps: 10
    sampled with --respacing 4 walks 4), where keeping both ran the recipe's chain or refused the pair."""
    from zoo.sample import build_solver

    respaced = {"sample": {"solver": {"type": "ddim", "respacing": "ddim10", "eta": 0.0}}}
    _, spec = build_solver(respaced, None, 4)
    assert spec == {"type": "ddim", "steps": 4, "eta": 0.0}
    stepped = {"sample": {"solver": {"type": "ddim", "steps": 10, "eta": 0.0}}}
    _, spec = build_solver(stepped, None, None, respacing="4")
    assert spec == {"type": "ddim", "respacing": "4", "eta": 0.0}


def test_a_recipe_without_train_seed_samples_the_weights_zoo_train_starts_from():
    """zoo sample RECIPE builds the weights zoo train would start from: without train.seed that is
    torch.manual_seed(TRAIN_DEFAULTS['seed']) (0), so the fresh model's samples are those of step 0 of the run
    the recipe trains; another fallback seed gave other weights than the run's."""
    from zoo.sample import model_for, sample_recipe
    from zoo.training.sections import TRAIN_DEFAULTS

    recipe = sample_recipe(PIXELS)
    assert "seed" not in (recipe.get("train") or {})
    model, origin = model_for(PIXELS, recipe)
    torch.manual_seed(TRAIN_DEFAULTS["seed"])
    expected = zoo.build_model(recipe).state_dict()
    assert "freshly initialised" in origin
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("solver, advice", [
    ("{type: ddim, steps: 1}", "or the ddim_grid solver (a time grid from pure noise) for one"),
    ("{type: ode, method: dopri5, steps: 4}", "(drop its steps, or pick a fixed-grid method"),
])
def test_zoo_trains_solver_advice_names_no_flag_it_lacks(tmp_path, capsys, solver, advice):
    """zoo train checks the grids' solver at its start: the advice said '--solver ddim_grid' (zoo train has no
    --solver) and 'drop --steps' (zoo train's --steps is its training steps, not the solver's)."""
    from zoo.cli import main

    recipe = Path(__file__).parent / "recipes" / "tiny_train.yaml"
    assert main(["train", str(recipe), "--out", str(tmp_path / "run"), "--steps", "1", "--set", "train.sample_every=1",
                 "--set", f"sample.solver={solver}"]) == 2
    err = capsys.readouterr().err
    assert advice in err and "--solver" not in err and "--steps" not in err
