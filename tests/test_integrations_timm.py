"""zoo recipes as timm models: names, same module as zoo.build_model, overrides, checkpoints, timm layers."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch

import zoo
import zoo.integrations.timm as zoo_timm
from zoo.checkpoint import save_checkpoint
from zoo.cli import main
from zoo.errors import UserError
from zoo.meta import build_on_meta

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
TINY = {"depth": 1, "hidden_size": 64, "num_heads": 2, "input_size": 8}  # DiT-S/2's recipe, shrunk
TINY_SET = [f"model.{k}={v}" for k, v in TINY.items()]


pytestmark = pytest.mark.usefixtures("one_thread")


def _expected_names() -> set[str]:
    """``zoo_`` + the recipe's path under recipes/ with '/' as '_', every recipe but the _base_ ones."""
    return {"zoo_" + "_".join(p.relative_to(RECIPES).with_suffix("").parts)
            for p in RECIPES.rglob("*.yaml") if not p.name.startswith("_base_")}


def test_every_shipped_recipe_is_a_timm_model():
    listed = set(timm.list_models("zoo_*"))
    assert listed == _expected_names()
    assert {"zoo_dimr_xl_2r", "zoo_dit_xl_2_512", "zoo_ablation_row5_multibranch_tdln_glu"} <= listed
    assert not any("base" in name for name in listed)
    assert timm.list_models("zoo_*", pretrained=True) == []  # no weights to download


def test_create_model_is_build_model_on_meta_for_the_paper_recipe():
    via_timm = build_on_meta(lambda: timm.create_model("zoo_dimr_xl_2r", pretrained=False))
    direct = build_on_meta(lambda: zoo.build_model("dimr_xl_2r"))
    assert type(via_timm) is type(direct)
    assert sum(p.numel() for p in via_timm.parameters()) == 505_046_408  # the official DiMR-XL/2R count
    assert {k: v.shape for k, v in via_timm.state_dict().items()} == {k: v.shape for k, v in direct.state_dict().items()}


def test_create_model_with_overrides_gives_the_same_outputs_for_the_same_weights():
    model = timm.create_model("zoo_dit_s_2", **TINY).double().eval()
    direct = zoo.build_model("dit_s_2", TINY_SET).double().eval()
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in direct.parameters())
    torch.manual_seed(0)
    state = {k: torch.randn_like(v) for k, v in direct.state_dict().items()}  # also un-zeroes adaLN-Zero
    model.load_state_dict(state), direct.load_state_dict(state)
    x, t, y = torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.tensor([3, 900]), torch.tensor([1, 1000])
    assert torch.equal(model(x, t, y), direct(x, t, y))  # same module, same weights: bit-identical


def test_nested_override_and_typo_is_the_same_error_as_set():
    model = build_on_meta(lambda: timm.create_model("zoo_dimr_xl_2r", **{"branches.1.depth": 2}))
    assert len(model.branches[1].blocks) == 3  # nb 2 builds 2*(2//2)+1 blocks
    with pytest.raises(UserError) as via_timm:
        timm.create_model("zoo_dit_s_2", depht=2)
    with pytest.raises(UserError) as via_set:
        zoo.build_model("dit_s_2", ["model.depht=2"])
    a, b = via_timm.value, via_set.value
    assert (a.message, a.key_path, a.suggestion) == (b.message, b.key_path, b.suggestion)
    assert "did you mean depth?" in str(a) and str(a).startswith("timm.create_model('zoo_dit_s_2', depht=...)")
    assert main(["build", "dit_s_2", "--set", "model.depht=2"]) == 2  # the CLI says the same, exit 2


def test_pretrained_is_a_clear_error_not_a_download():
    with pytest.raises(UserError, match="no downloadable weights.*checkpoint_path"):
        timm.create_model("zoo_dit_s_2", pretrained=True)
    with pytest.raises(UserError, match="plain data"):
        timm.create_model("zoo_dit_s_2", depth=torch.tensor(1))


def test_a_missing_checkpoint_path_is_one_line_and_the_model_carries_a_pretrained_cfg(tmp_path):
    """timm printed 'No checkpoint found' and raised a FileNotFoundError with no message; timm's
    data-config helpers read model.pretrained_cfg, which zoo models lacked (AttributeError)."""
    with pytest.raises(UserError, match=r"checkpoint_path .*nowhere does not exist \(pass a zoo checkpoint directory"):
        timm.create_model("zoo_dit_s_2", checkpoint_path=str(tmp_path / "nowhere"), **TINY)
    model = timm.create_model("zoo_dit_s_2", **TINY)
    assert model.pretrained_cfg["architecture"] == "zoo_dit_s_2"
    assert timm.data.resolve_model_data_config(model)["input_size"] == (4, 8, 8)


@pytest.fixture
def checkpoint(tmp_path) -> tuple[Path, dict, dict]:
    """A zoo checkpoint of the tiny DiT-S/2 whose model and EMA weights differ."""
    recipe = zoo.load_recipe("dit_s_2", TINY_SET)
    model = zoo.build_model(recipe)
    ema = {k: v + 1.0 for k, v in model.state_dict().items()}
    save_checkpoint(tmp_path / "ckpt", model, recipe, ema=ema)
    return tmp_path / "ckpt", model.state_dict(), ema


def test_checkpoint_path_loads_a_zoo_checkpoint_directory(checkpoint):
    directory, weights, ema = checkpoint
    model = timm.create_model("zoo_dit_s_2", checkpoint_path=str(directory), **TINY)
    assert all(torch.equal(v, ema[k]) for k, v in model.state_dict().items())  # EMA first, like timm's use_ema
    zoo_timm.load_zoo_checkpoint(model, directory, use_ema=False)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_checkpoint_path_takes_a_run_directory_as_its_last(checkpoint, tmp_path):
    """A zoo train run directory (RUN/last/config.json) went to timm's own loader: a bare FileNotFoundError."""
    import shutil

    directory, _, ema = checkpoint
    run = tmp_path / "run"
    shutil.copytree(directory, run / "last")
    model = timm.create_model("zoo_dit_s_2", checkpoint_path=str(run), **TINY)
    assert all(torch.equal(v, ema[k]) for k, v in model.state_dict().items())


def test_checkpoint_path_is_strict_and_names_the_recipe_difference(checkpoint):
    directory, _, _ = checkpoint
    with pytest.raises(UserError) as info:
        timm.create_model("zoo_dit_s_2", checkpoint_path=str(directory), **{**TINY, "depth": 2})
    assert "missing keys: blocks.1." in str(info.value)
    assert "model.depth is 1 in its recipe, 2 in this model's" in str(info.value)


def test_checkpoint_path_refuses_settings_that_keep_the_shapes_but_not_the_function(tmp_path):
    """num_heads=4 on a 2-head checkpoint loaded (the tensors fit) and computed something else, with only a
    warning that also listed keys the run's recipe left at their defaults (block, norm, mlp) as differences."""
    import warnings

    recipe = zoo.load_recipe(str(Path(__file__).parent / "recipes" / "tiny_train.yaml"))
    save_checkpoint(tmp_path / "ckpt", zoo.build_model(recipe), recipe)
    same = {"input_size": 8, "in_channels": 3, "hidden_size": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0,
            "num_classes": 4, "learn_sigma": False, "class_dropout_prob": 0.1}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same model written another way: no warning, no error
        timm.create_model("zoo_dit_s_2", checkpoint_path=str(tmp_path / "ckpt"), **same)
    with pytest.raises(UserError) as info:
        timm.create_model("zoo_dit_s_2", checkpoint_path=str(tmp_path / "ckpt"), **{**same, "num_heads": 4})
    assert info.value.message.startswith(f"checkpoint_path {tmp_path / 'ckpt'}: model.num_heads is 2 in its recipe, "
                                         "4 in this model's")
    assert "with the checkpoint's num_heads" in info.value.suggestion
    # a training-only rate is no difference (zoo train drops labels itself; eval outputs are the same)
    timm.create_model("zoo_dit_s_2", checkpoint_path=str(tmp_path / "ckpt"), **{**same, "class_dropout_prob": 0.2})
    # a difference the recipe's default makes, not a keyword: the fix is to pass the checkpoint's value
    recipe["model"] = {**recipe["model"], "hidden_size": 48}
    save_checkpoint(tmp_path / "wide", zoo.build_model(recipe), recipe)
    unsaid = {k: v for k, v in same.items() if k != "num_heads"}
    with pytest.raises(UserError) as info:
        timm.create_model("zoo_dit_s_2", checkpoint_path=str(tmp_path / "wide"), **{**unsaid, "hidden_size": 48})
    assert "model.num_heads is 2 in its recipe, 6 in this model's" in info.value.message
    assert info.value.suggestion.startswith("pass num_heads=2")


def test_checkpoint_path_of_a_run_without_last_names_its_newest_step(checkpoint, tmp_path):
    """timm printed 'No checkpoint found' and raised FileNotFoundError('') for a run whose last/ is gone."""
    import shutil

    directory, _, _ = checkpoint
    shutil.copytree(directory, tmp_path / "run" / "step_0000030")
    with pytest.raises(UserError, match=r"step_0000030"):
        timm.create_model("zoo_dit_s_2", checkpoint_path=str(tmp_path / "run"), **TINY)


def test_timm_files_still_load_through_timm(tmp_path):
    model = timm.create_model("zoo_dit_s_2", **TINY)
    torch.save(model.state_dict(), tmp_path / "weights.pth")
    again = timm.create_model("zoo_dit_s_2", checkpoint_path=str(tmp_path / "weights.pth"), **TINY)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in again.state_dict().items())


def test_zoo_layers_do_what_timm_layers_do_with_the_same_keys():
    """zoo keeps its own Mlp/GeGluMlp/PatchEmbed (blocks/mlp.py says why); they must equal timm's."""
    from timm.layers import GluMlp, Mlp, PatchEmbed

    from zoo.backbones.common import PatchEmbed as ZooPatchEmbed
    from zoo.blocks.mlp import GeGluMlp, Mlp as ZooMlp

    pairs = [
        (ZooMlp(8, 24, act="gelu_tanh"), Mlp(8, 24, act_layer=lambda: torch.nn.GELU(approximate="tanh")), (3, 5, 8)),
        (GeGluMlp(8, 16), GluMlp(8, 32, act_layer=torch.nn.GELU, gate_last=False), (3, 5, 8)),
        (ZooPatchEmbed(4, 8, 2), PatchEmbed(img_size=None, patch_size=2, in_chans=4, embed_dim=8), (2, 4, 8, 8)),
    ]
    for ours, theirs, shape in pairs:
        ours, theirs = ours.double(), theirs.double()
        theirs.load_state_dict(ours.state_dict(), strict=True)  # same keys, same shapes
        x = torch.randn(*shape, dtype=torch.float64)
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-14)


@pytest.mark.slow
def test_building_a_model_does_not_import_timm():
    """The reason zoo's layers are not timm's: importing timm (and torchvision) would slow every command."""
    import subprocess
    import sys

    code = "import sys, zoo; zoo.build_model('dit_s_2'); print('timm' in sys.modules, 'torchvision' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_non_finite_options_are_refused_by_name():
    for value in (float("nan"), float("inf")):
        with pytest.raises(UserError, match="NaN and infinities are refused"):
            zoo_timm.model_overrides({"mlp_ratio": value})
    assert zoo_timm.model_overrides({"mlp_ratio": 2.5, "block": {"qkv_bias": False}}) == [
        "model.mlp_ratio=2.5", 'model.block={"qkv_bias": false}']


def test_timms_data_config_gives_zoos_input_range_not_imagenets():
    """resolve_model_data_config filled in ImageNet's mean/std where zoo left them out: a timm transform fed a
    pixel model normalised images instead of mapping them to [-1, 1]; a latent model is not normalised."""
    from timm.data import create_transform, resolve_model_data_config

    pixel = resolve_model_data_config(timm.create_model("zoo_emoji32_dit"))
    assert pixel["mean"] == pixel["std"] == (0.5, 0.5, 0.5) and pixel["crop_pct"] == 1.0
    from PIL import Image

    white = create_transform(**pixel)(Image.new("RGB", (40, 32), "white"))
    assert white.shape == (3, 32, 32) and torch.equal(white, torch.ones_like(white))  # 255 -> 1.0, as zoo's data
    with torch.device("meta"):
        latent = resolve_model_data_config(timm.create_model("zoo_dit_s_2"))
    assert latent["mean"] == (0.0,) * 4 and latent["std"] == (1.0,) * 4


def test_a_setting_the_checkpoint_left_at_its_default_is_shown_with_that_default(tmp_path):
    """'model.block.qkv_bias is absent in its recipe, false in this model's': the run used the block's
    default (true), which the message must say."""
    recipe = zoo.load_recipe(str(Path(__file__).parent / "recipes" / "tiny_train.yaml"), ["model.block=transformer"])
    save_checkpoint(tmp_path / "ckpt", zoo.build_model(recipe), recipe)
    same = {"input_size": 8, "in_channels": 3, "hidden_size": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0,
            "num_classes": 4, "learn_sigma": False}
    with pytest.raises(UserError) as info:
        timm.create_model("zoo_dit_s_2", checkpoint_path=str(tmp_path / "ckpt"), **same, **{"block.qkv_bias": False})
    assert "model.block.qkv_bias is true (the default) in its recipe, false in this model's" in info.value.message
    with pytest.raises(UserError) as info:  # the model's side left at its default, the checkpoint's set
        recipe["model"]["block"] = {"type": "transformer", "qkv_bias": False}
        save_checkpoint(tmp_path / "nobias", zoo.build_model(recipe), recipe)
        timm.create_model("zoo_dit_s_2", checkpoint_path=str(tmp_path / "nobias"), **same)
    assert "model.block.qkv_bias is false in its recipe, true (the default) in this model's" in info.value.message
