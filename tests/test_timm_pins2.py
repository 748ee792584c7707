"""Pins on zoo.integrations.timm that no other test held: timm.create_model's device= and dtype=, the
num_classes timm's helpers read from pretrained_cfg, a pretrained_cfg refused like pretrained=True,
registering again without timm's overwrite warnings, and the two suggestions a shape-keeping recipe
difference gets (a nested keyword counts as given; a default is not said twice). Tiny DiTs on the CPU."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import timm
import torch

import zoo
import zoo.integrations.timm as zoo_timm
from zoo.checkpoint import save_checkpoint
from zoo.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"depth": 1, "hidden_size": 32, "num_heads": 2, "input_size": 8}  # DiT-S/2's recipe, shrunk
TRAIN = Path(__file__).parent / "recipes" / "tiny_train.yaml"
SAME = {"input_size": 8, "in_channels": 3, "hidden_size": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0,
        "num_classes": 4, "learn_sigma": False}  # tiny_train.yaml's model through zoo_dit_s_2's keywords


def test_create_model_builds_in_the_dtype_and_on_the_device_asked_for():
    """timm passes dtype= and device= to the entrypoint: a create that dropped them gave float32 CPU models."""
    model = timm.create_model("zoo_dit_s_2", dtype=torch.float64, **TINY)
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    meta = timm.create_model("zoo_dit_s_2", device="meta", **TINY)
    assert {p.device.type for p in meta.parameters()} == {"meta"}


def test_pretrained_cfg_carries_the_models_num_classes():
    """timm's helpers read pretrained_cfg['num_classes']; it was None where the model has a label table."""
    assert timm.create_model("zoo_dit_s_2", **TINY).pretrained_cfg["num_classes"] == 1000
    assert timm.create_model("zoo_dit_s_2", num_classes=7, **TINY).pretrained_cfg["num_classes"] == 7


@pytest.mark.parametrize("given", [{"pretrained_cfg": {"file": "weights.pth"}},
                                   {"pretrained_cfg_overlay": {"file": "weights.pth"}}])
def test_a_pretrained_cfg_is_refused_like_pretrained_true(given):
    """A pretrained_cfg (or overlay) names weights to fetch; zoo downloads nothing and must say so, not ignore it."""
    with pytest.raises(UserError, match="no downloadable weights"):
        timm.create_model("zoo_dit_s_2", **given, **TINY)


def test_registering_again_overwrites_nothing():
    """register_all (run again on a reload) re-registered every name: timm warned 'Overwriting zoo_... in
    registry' once per recipe."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        names = zoo_timm.register_all()
    assert names == zoo_timm.MODEL_NAMES


def test_a_nested_difference_under_a_given_keyword_says_drop_that_keyword(tmp_path):
    """mlp={...} given, checkpoint's mlp.act differs: the keyword the caller passed is 'mlp', not 'mlp.act', and
    the fix is to pass the checkpoint's value or leave the keyword out, not 'pass mlp.act=...'."""
    recipe = zoo.load_recipe(str(TRAIN), ['model.mlp={"type": "mlp", "act": "gelu"}'])
    save_checkpoint(tmp_path / "ckpt", zoo.build_model(recipe), recipe)
    with pytest.raises(UserError) as info:
        timm.create_model("zoo_dit_s_2", checkpoint_path=str(tmp_path / "ckpt"), **SAME,
                          mlp={"type": "mlp", "act": "gelu_tanh"})
    assert "model.mlp.act is \"gelu\" in its recipe, \"gelu_tanh\" in this model's" in info.value.message
    assert info.value.suggestion == "create the model with the checkpoint's mlp.act, or without that keyword"


def test_passing_the_checkpoints_default_is_said_as_a_plain_value(tmp_path):
    """The checkpoint's recipe left num_heads at DiT's default (16), the shipped recipe says 6: the fix is
    'pass num_heads=16', a keyword to copy, not 'pass num_heads=16 (the default)'."""
    recipe = zoo.load_recipe(str(TRAIN), ["model.hidden_size=48"])
    recipe["model"] = {k: v for k, v in recipe["model"].items() if k != "num_heads"}
    save_checkpoint(tmp_path / "ckpt", zoo.build_model(recipe), recipe)
    keywords = {k: v for k, v in SAME.items() if k != "num_heads"}
    with pytest.raises(UserError) as info:
        timm.create_model("zoo_dit_s_2", checkpoint_path=str(tmp_path / "ckpt"), **{**keywords, "hidden_size": 48})
    assert "model.num_heads is 16 (the default) in its recipe, 6 in this model's" in info.value.message
    assert info.value.suggestion.startswith("pass num_heads=16 (the recipe's own value")
