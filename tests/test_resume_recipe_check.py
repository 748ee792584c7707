"""Which recipe changes ``zoo train --resume`` refuses: component defaults spelled out are not changes."""

from functools import partial
from pathlib import Path

import pytest
from torch import nn

import zoo
from zoo import registry
from zoo.cli import main
from zoo.errors import UserError
from zoo.training.rundir import check_resume_recipe

HERE = Path(__file__).parent / "recipes"
DIFFUSION = {"time_input": "dit_index"}


def check(then: dict, now: dict) -> None:
    """Both directions: the checkpoint spells it and the recipe leaves it out, and the reverse."""
    check_resume_recipe({"model": then, "diffusion": DIFFUSION}, {"model": now, "diffusion": DIFFUSION}, Path("ckpt"))
    check_resume_recipe({"model": now, "diffusion": DIFFUSION}, {"model": then, "diffusion": DIFFUSION}, Path("ckpt"))


def refused(then: dict, now: dict) -> str:
    """The one-line message refusing ``now`` against the checkpoint's ``then``."""
    with pytest.raises(UserError) as err:
        check_resume_recipe({"model": then, "diffusion": DIFFUSION}, {"model": now, "diffusion": DIFFUSION}, Path("ckpt"))
    return str(err.value)


@pytest.mark.parametrize("spelled", [
    {"norm": "adaln_zero"}, {"norm": {"type": "adaln_zero"}}, {"block": "transformer"},
    {"block": {"type": "transformer", "qkv_bias": True}}, {"mlp": {"type": "mlp", "act": "gelu_tanh"}},
    {"mlp": {"type": "mlp", "act": "gelu_tanh", "bias": True, "hidden_features": None}},
])
def test_dits_component_defaults_spelled_out_are_no_change(spelled):
    check({"type": "dit", "depth": 2}, {"type": "dit", "depth": 2, **spelled})


@pytest.mark.parametrize("changed, path", [
    ({"mlp": "mlp"}, "model.mlp"),  # Mlp's own act is gelu; DiT's default is gelu_tanh
    ({"norm": "layernorm"}, "model.norm"),
    ({"mlp": {"type": "mlp", "act": "gelu_tanh", "bias": False}}, "model.mlp"),
])
def test_a_component_other_than_the_default_is_still_a_change(changed, path):
    assert f"the recipe's {path} differs" in refused({"type": "dit"}, {"type": "dit", **changed})
    assert f"the recipe's {path} differs" in refused({"type": "dit", **changed}, {"type": "dit"})


@pytest.mark.parametrize("named, spelled", [
    ("logit_normal", {"type": "logit_normal", "mean": 0.0, "std": 1.0}), ("uniform", {"type": "uniform"}),
])
def test_a_time_sampling_with_its_defaults_spelled_out_is_no_change(named, spelled):
    """A run trained with time_sampling logit_normal was refused on resume with {type: logit_normal, mean: 0.0,
    std: 1.0} (the same draws): 'diffusion.time_sampling.mean differs (absent there, 0.0 now)'."""
    for then, now in ((named, spelled), (spelled, named)):
        check_resume_recipe({"diffusion": {**DIFFUSION, "time_sampling": then}},
                            {"diffusion": {**DIFFUSION, "time_sampling": now}}, Path("ckpt"))
    with pytest.raises(UserError, match="diffusion.time_sampling.mean differs"):
        check_resume_recipe({"diffusion": {**DIFFUSION, "time_sampling": "logit_normal"}},
                            {"diffusion": {**DIFFUSION, "time_sampling": {"type": "logit_normal", "mean": 1.0}}},
                            Path("ckpt"))


def test_an_objective_with_its_defaults_spelled_out_is_no_change():
    check_resume_recipe({"diffusion": {**DIFFUSION, "objective": "hybrid_vlb"}},
                        {"diffusion": {**DIFFUSION, "objective": {"type": "hybrid_vlb", "vlb_weight": 1.0,
                                                                  "decoder_cdf": "tanh"}}}, Path("ckpt"))
    with pytest.raises(UserError, match="diffusion.objective.decoder_cdf differs"):
        check_resume_recipe({"diffusion": {**DIFFUSION, "objective": "hybrid_vlb"}},
                            {"diffusion": {**DIFFUSION, "objective": {"type": "hybrid_vlb", "decoder_cdf": "exact"}}},
                            Path("ckpt"))


def test_nested_defaults_of_a_dimr_branch_spelled_out_are_no_change():
    block = {"type": "transformer", "num_heads": 2}
    then = {"type": "dimr", "branches": [{"dim": 32, "depth": 2, "block": block}]}
    check(then, {"type": "dimr", "norm": "td_layernorm", "branches": [
        {"dim": 32, "depth": 2, "patch_size": 1, "block": {**block, "norm": {"type": "layernorm", "eps": 1e-5},
                                                            "mlp": "mlp"}}]})
    message = refused(then, {"type": "dimr", "branches": [{"dim": 32, "depth": 2, "block": {**block, "norm": "rmsnorm"}}]})
    assert "model.branches.0.block.norm differs" in message


class Unlisted(nn.Module):
    """A block class no registry lists."""


class DefaultsNet(nn.Module):
    """A backbone whose defaults have no recipe form."""

    def __init__(self, block=Unlisted, mlp=partial(zoo.registry.get("block", "mlp"), 4)):
        super().__init__()


def test_a_default_without_a_recipe_form_counts_a_spelled_value_as_a_change():
    zoo.register("backbone", "defaults_net")(DefaultsNet)
    try:
        assert "model.block differs" in refused({"type": "defaults_net"}, {"type": "defaults_net", "block": "transformer"})
        assert "model.mlp differs" in refused({"type": "defaults_net"}, {"type": "defaults_net", "mlp": "mlp"})
    finally:
        registry.unregister("backbone", "defaults_net")


def test_another_backbone_or_component_type_is_named_as_the_type():
    message = refused({"type": "dit", "depth": 2}, {"type": "uvit", "block": {"type": "transformer"}, "depth": 2})
    assert "the recipe's model.type differs from the checkpoint's (\"dit\" there, \"uvit\" now)" in message
    branch = {"dim": 32, "depth": 2, "block": "transformer"}
    message = refused({"type": "dimr", "branches": [branch]},
                      {"type": "dimr", "branches": [{**branch, "block": {"type": "convnext", "kernel_size": 7}}]})
    assert "model.branches.0.block.type differs from the checkpoint's (\"transformer\" there, \"convnext\" now)" in message


def test_resume_with_dits_default_norm_spelled_out(tmp_path, capsys):
    """The audit's repro, through the CLI."""
    args = ["train", str(HERE / "tiny_train.yaml"), "--out", str(tmp_path), "--set", "train.sample_every=0"]
    assert main([*args, "--set", "train.steps=2"]) == 0
    for spelled in ("model.norm=adaln_zero", "model.block=transformer", "model.mlp={type: mlp, act: gelu_tanh}"):
        assert main([*args, "--resume", str(tmp_path), "--set", "train.steps=3", "--set", spelled]) == 0, spelled
    capsys.readouterr()
    assert main([*args, "--resume", str(tmp_path), "--set", "train.steps=4", "--set", "model.mlp=mlp"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.mlp differs from the checkpoint's" in err


def test_a_misfit_names_only_the_model_changes_not_a_diffusion_change_beside_them():
    """Weights that no longer fit are a model change's doing: the refusal and its fix name model.depth,
    not a diffusion change made beside it (which keeps the weights' shapes)."""
    then = {"model": {"type": "dit", "depth": 2}, "diffusion": {**DIFFUSION, "prediction": "eps"}}
    now = {"model": {"type": "dit", "depth": 3}, "diffusion": {**DIFFUSION, "prediction": "v"}}
    with pytest.raises(UserError) as err:
        check_resume_recipe(then, now, Path("ckpt"), misfit="unexpected keys: blocks.2.attn.qkv.weight")
    assert "model.depth (2 there, 3 now) differs" in err.value.message
    assert err.value.key_path == "model.depth"
    assert "diffusion" not in err.value.message and "diffusion" not in err.value.suggestion
    assert "(model.depth: 2)" in err.value.suggestion
