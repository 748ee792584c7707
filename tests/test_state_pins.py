"""Pins on state and recipe handling whose documented behaviour no other test held: EMA copies, AdamW's
default betas, recipe merging and overrides, YAML booleans, list differences, checkpoint checks and
ordering, sample images and labels, and the converter's resolution hint for pixel DiTs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from zoo.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# --- training state ---------------------------------------------------------------------------


def test_ema_copy_to_writes_every_parameter():
    """EMA.copy_to must write all shadows into the model: a copy that skipped one left raw weights in it."""
    from zoo.training.ema import EMA

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    ema = EMA(model, decay=0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    ema.update()  # shadows now differ from both the start and the current weights
    target = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    with torch.no_grad():
        for p in target.parameters():
            p.fill_(123.0)  # differs from every shadow
    ema.copy_to(target)
    shadows = ema.state_dict()
    names = [n for n, _ in target.named_parameters()]
    assert names == list(shadows)
    for name, p in target.named_parameters():
        assert torch.equal(p, shadows[name].to(p.dtype)), name


def test_adamw_default_betas_are_torchs():
    """build_optimizer without train.betas uses AdamW's (0.9, 0.999); (0.9, 0.99) went unnoticed."""
    from zoo.training.optim import build_optimizer

    model = nn.Linear(3, 2)
    opt = build_optimizer(model, {"lr": 1e-3, "weight_decay": 0.0})
    assert all(g["betas"] == (0.9, 0.999) for g in opt.param_groups)
    assert build_optimizer(model, {"lr": 1e-3, "betas": [0.99, 0.99]}).param_groups[0]["betas"] == (0.99, 0.99)


# --- recipes ----------------------------------------------------------------------------------


def test_base_component_given_by_target_is_replaced_by_one_given_by_type(tmp_path):
    """A _target_ component in a base and a {type: ...} one over it are different components: the
    override replaces it whole (the module doc), where the base's _target_ and keys leaked into it."""
    from zoo.recipe import resolve

    _write(tmp_path / "base.yaml", "model:\n  type: dit\n  block: {_target_: p.B, k: 1}\n")
    child = _write(tmp_path / "child.yaml", "_base_: base.yaml\nmodel:\n  block: {type: transformer}\n")
    assert resolve(child).data["model"]["block"] == {"type": "transformer"}
    # and the other way round
    _write(tmp_path / "base2.yaml", "model:\n  type: dit\n  block: {type: transformer, k: 1}\n")
    child2 = _write(tmp_path / "child2.yaml", "_base_: base2.yaml\nmodel:\n  block: {_target_: p.B}\n")
    assert resolve(child2).data["model"]["block"] == {"_target_": "p.B"}


def test_mapping_overrides_apply_in_their_order():
    """A mapping of overrides applies in its order, as a --set list does: reversed, the whole component
    given last dropped the key set inside it."""
    from zoo.recipe import resolve

    overrides = {"model.block": {"type": "convnext"}, "model.block.kernel_size": 3}
    as_mapping = resolve("dit_s_2", overrides).data["model"]["block"]
    assert as_mapping == {"type": "convnext", "kernel_size": 3}
    as_list = resolve("dit_s_2", ['model.block={"type": "convnext"}', "model.block.kernel_size=3"]).data
    assert as_list["model"]["block"] == as_mapping
    # the other order gives the other answer: the order is what decides
    reverse = {"model.block.kernel_size": 3, "model.block": {"type": "convnext"}}
    assert resolve("dit_s_2", reverse).data["model"]["block"] == {"type": "convnext"}


def test_replaced_base_component_leaves_no_origins_behind(tmp_path):
    """A base's component replaced by another type is the override's: its keys' file/line went with it
    (errors about the new component named the base's line of a key it no longer has)."""
    from zoo.recipe import resolve

    base = _write(tmp_path / "base.yaml", "model:\n  type: dit\n  block:\n    type: convnext\n    kernel_size: 7\n")
    child = _write(tmp_path / "child.yaml", "_base_: base.yaml\nmodel:\n  block:\n    type: transformer\n")
    recipe = resolve(child)
    assert recipe.data["model"]["block"] == {"type": "transformer"}
    assert not [p for p in recipe.origins if p[:3] == ("model", "block", "kernel_size")]
    file, line = recipe.origin_of("model.block.kernel_size")
    assert (file, line) == recipe.origins[("model", "block")]
    assert Path(file).name == "child.yaml" and str(base) not in file


@pytest.mark.parametrize("text, value", [("TRUE", True), ("True", True), ("true", True),
                                         ("FALSE", False), ("False", False), ("false", False)])
def test_recipe_yaml_reads_every_core_schema_boolean(text, value):
    """The YAML 1.2 core schema's booleans include TRUE / FALSE: `a: TRUE` read as the string 'TRUE'."""
    from zoo.recipe_yaml import parse_yaml

    data, _ = parse_yaml(f"a: {text}\n", "r.yaml")
    assert data == {"a": value} and type(data["a"]) is bool


def test_lists_of_other_lengths_differ():
    """first_difference of [1, 2] and [1, 2, 3] is at the list: zip compared the common prefix and found none."""
    from zoo.recipe_diff import first_difference, model_difference

    assert first_difference([1, 2], [1, 2, 3], "x") == "x"
    assert first_difference([1, 2, 3], [1, 2], "x") == "x"
    assert first_difference([1, 2], [1, 2], "x") is None
    branch = dict(dim=16, depth=1, patch_size=1, block=dict(type="convnext", norm="td_rmsnorm"))
    then = dict(type="dimr", in_channels=3, input_size=8, num_classes=6, branches=[branch])
    now = dict(then, branches=[branch, dict(branch, dim=8)])  # a resume that adds a branch
    assert model_difference(then, now) == "model.branches"


# --- checkpoints ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_check_finite_refuses_nan_and_inf_in_every_float_dtype(dtype, bad):
    """bf16 weights holding NaN / inf are refused like any other float: a bf16 skip let them load."""
    from zoo.weights import check_finite

    state = {"ok": torch.zeros(3, dtype=dtype), "w": torch.tensor([1.0, bad, 2.0], dtype=dtype)}
    with pytest.raises(UserError) as err:
        check_finite(state, "model.safetensors")
    assert "tensor w holds NaN or inf values" in err.value.message
    check_finite({"ok": torch.zeros(3, dtype=dtype)}, "model.safetensors")  # finite: accepted


def test_newest_step_is_the_one_sealed_last_not_the_highest_number(tmp_path):
    """A run resumed from an older step branches: its newest checkpoint is the one saved last
    (newest_step's doc), not step_0000200 by name."""
    from zoo.checkpoint import newest_step, save_checkpoint

    weights = {"w": torch.zeros(2)}
    save_checkpoint(tmp_path / "step_0000200", weights, {}, state={"step": 200})
    save_checkpoint(tmp_path / "step_0000100", weights, {}, state={"step": 100})  # the branch, saved later
    assert newest_step(tmp_path) == tmp_path / "step_0000100"


def test_trainer_state_of_step_0_is_accepted(tmp_path):
    """A checkpoint saved before the first update has step 0, a step number: it was refused as 'not one zoo train wrote'."""
    from zoo.checkpoint import load_trainer_state, save_checkpoint

    save_checkpoint(tmp_path / "ckpt", {"w": torch.zeros(2)}, {}, state={"step": 0})
    assert load_trainer_state(tmp_path / "ckpt")["step"] == 0
    save_checkpoint(tmp_path / "bad", {"w": torch.zeros(2)}, {}, state={"step": -1})
    with pytest.raises(UserError) as err:
        load_trainer_state(tmp_path / "bad")
    assert "step -1 is not a step number" in err.value.message


# --- sampling ---------------------------------------------------------------------------------


def test_pixel_samples_outside_minus_one_one_become_images_in_zero_one():
    """to_images maps pixels from [-1, 1] to [0, 1] (its doc): a sample of 3.0 became 2.0 without the clamp."""
    from zoo.sample import to_images

    x = torch.tensor([3.0, 1.0, 0.0, -1.0, -3.0]).view(1, 1, 1, 5).expand(1, 3, 1, 5)
    images = to_images(x, {"data": {"latent": False}}, None)
    expected = torch.tensor([1.0, 1.0, 0.5, 0.0, 0.0]).view(1, 1, 1, 5).expand(1, 3, 1, 5)
    assert images.dtype == torch.float32 and torch.equal(images, expected)
    assert images.max() == 1.0 and images.min() == 0.0


def test_null_label_inside_the_data_classes_is_refused():
    """diffusion.null_label 10 with data.num_classes 11 makes label 10 both a class and "no class": refused
    (a check of data > null + 1 let it through)."""
    from zoo.sample import num_classes

    with pytest.raises(UserError) as err:
        num_classes({"data": {"num_classes": 11}, "diffusion": {"null_label": 10}})
    assert "diffusion.null_label 10 is one of its labels 0..10" in err.value.message
    assert err.value.key_path == "diffusion.null_label"
    assert num_classes({"data": {"num_classes": 10}, "diffusion": {"null_label": 10}}) == 10


# --- conversion -------------------------------------------------------------------------------


def test_pixel_dit_of_another_resolution_suggests_its_pixel_image_size():
    """A pixel DiT's image size is its input size (no VAE): the hint said data.image_size=<8x it>."""
    from zoo.convert.dit import explain_shapes

    def state(tokens):
        return {"pos_embed": torch.zeros(1, tokens, 8), "x_embedder.proj.weight": torch.zeros(8, 3, 2, 2),
                "blocks.0.attn.qkv.weight": torch.zeros(24, 8)}

    with pytest.raises(UserError) as err:
        explain_shapes(state(16), state(4), {"data": {"latent": False}})  # 4x4 patches of 2: 8 px
    assert err.value.suggestion == "--set model.input_size=8 --set data.image_size=8"
    with pytest.raises(UserError) as err:
        explain_shapes(state(16), state(4), {"data": {"latent": True}})  # latents: the SD VAE's 8x
    assert err.value.suggestion == "--set model.input_size=8 --set data.image_size=64"


def test_step_folders_past_ten_million_steps_are_checkpoints(tmp_path):
    """step_10000000 (8 digits, as f"step_{step:07d}" writes it from step 1e7 on, and train.steps may be 1e9)
    matched no 7-digit pattern: resume, newest_step and the guard against reusing a run folder skipped it."""
    import zoo
    from zoo.checkpoint import newest_step, save_checkpoint
    from zoo.guards import holds_a_run

    recipe = zoo.load_recipe(Path(__file__).parent / "recipes" / "tiny_train.yaml")
    model = zoo.build_model(recipe)
    save_checkpoint(tmp_path / "step_9999999", model, recipe)
    save_checkpoint(tmp_path / "step_10000000", model, recipe)  # sealed last
    assert holds_a_run(tmp_path) == "step_10000000/"
    assert newest_step(tmp_path) == tmp_path / "step_10000000"
