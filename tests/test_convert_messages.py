"""``zoo convert``: what it accepts beside the recipe, and the one line it says when the checkpoint is another model.

Tiny official checkpoints come from the golden files' state dicts (tests/golden), written to tmp_path.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from zoo.cli import main

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden"


def golden(name: str) -> dict:
    return torch.load(GOLDEN / f"golden_{name}.pt", weights_only=True)


def recipe(tmp_path: Path, base: str, model: dict, **sections: dict) -> Path:
    """A recipe file on a shipped base recipe (JSON is YAML)."""
    path = tmp_path / f"{base}_tiny.yaml"
    path.write_text(json.dumps({"_base_": str(ROOT / "recipes" / f"_base_{base}.yaml"), "model": model, **sections}))
    return path


def convert(tmp_path: Path, family: str, payload: object, recipe_file: Path, *extra: str) -> int:
    src = tmp_path / "official.pt"
    torch.save(payload, src)
    return main(["convert", family, str(src), "--recipe", str(recipe_file), "--out", str(tmp_path / "ckpt"), *extra])


def last_error(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


UVIT_MODEL = {"img_size": 16, "patch_size": 2, "in_chans": 4, "embed_dim": 64, "depth": 4, "num_heads": 2,
              "num_classes": 11}  # fmt: skip
UVIT_DATA = {"num_classes": 10, "image_size": 16}
DIMR_R2_MODEL = {"in_channels": 4, "input_size": 16, "num_classes": 11, "branches": [
    {"dim": 32, "depth": 3, "patch_size": 2, "block": {"type": "transformer", "num_heads": 4, "mlp_ratio": 2.0,
                                                       "qkv_bias": False, "norm": "td_rmsnorm", "mlp": "geglu_mlp"}},
    {"dim": 16, "depth": 2, "patch_size": 1, "block": {"type": "convnext", "variant": "dimr", "kernel_size": 7,
                                                       "mlp_ratio": 2.0, "norm": "td_rmsnorm", "mlp": "geglu_mlp"}},
]}  # fmt: skip
LABELS = {"diffusion": {"null_label": 10}, "data": {"num_classes": 10, "image_size": 128}}


@pytest.mark.parametrize("where", ["--config", "checkpoint"])
def test_uvit_use_checkpoint_of_every_released_config_converts(tmp_path, capsys, where):
    """use_checkpoint=True (recomputation in training: same weights, same outputs) was refused against a recipe
    that leaves it at False, so no released U-ViT config could be passed."""
    g = golden("uvit_tiny")
    config = {**g["config"], "use_checkpoint": True}
    payload: object = g["state_dict"]
    extra: tuple[str, ...] = ()
    if where == "--config":
        (tmp_path / "config.json").write_text(json.dumps(config))
        extra = ("--config", str(tmp_path / "config.json"))
    else:
        payload = {"config": config, "state_dict": g["state_dict"]}
    status = convert(tmp_path, "uvit", payload, recipe(tmp_path, "uvit", UVIT_MODEL, data=UVIT_DATA), *extra)
    assert status == 0, capsys.readouterr().err


def test_a_component_by_name_matches_the_same_component_as_a_table(tmp_path, capsys):
    """The official config's 'geglu_mlp' against a recipe's {type: geglu_mlp} was 'the recipe says ...'."""
    g = golden("dimr_tiny_r2")
    (tmp_path / "config.json").write_text(json.dumps(g["config"]))
    status = convert(tmp_path, "dimr", g["state_dict"], recipe(tmp_path, "dimr", DIMR_R2_MODEL, **LABELS),
                     "--config", str(tmp_path / "config.json"), "--set", "model.branches.0.block.mlp={type: geglu_mlp}")
    assert status == 0, capsys.readouterr().err


def test_a_dimr_checkpoint_with_more_stages_says_so(tmp_path, capsys):
    assert convert(tmp_path, "dimr", golden("dimr_tiny_r3")["state_dict"], ROOT / "recipes" / "dimr_xl_2r.yaml") == 2
    assert last_error(capsys) == (
        "zoo: error: key model.branches: the checkpoint has 3 stages (stages.0 to stages.2) and the recipe 2 branches "
        "(use a recipe with 3 branches, such as the shipped dimr_*_3r ones, with the checkpoint's official config as "
        "--config if you have it)")


def test_a_dimr_stage_of_another_block_kind_says_so(tmp_path, capsys):
    branch = {**DIMR_R2_MODEL["branches"][0], "dim": 16, "depth": 2, "patch_size": 1}
    model = {**DIMR_R2_MODEL, "branches": [DIMR_R2_MODEL["branches"][0], branch]}
    assert convert(tmp_path, "dimr", golden("dimr_tiny_r2")["state_dict"], recipe(tmp_path, "dimr", model, **LABELS)) == 2
    assert last_error(capsys) == (
        "zoo: error: key model.branches.1.block: stage 1 of the checkpoint holds ConvNeXt blocks while the recipe's "
        "branch 1 is a transformer branch (use the recipe of this checkpoint's model, with its official config as "
        "--config if you have it)")


def test_dit_without_learned_sigma_is_told_both_settings_it_needs(tmp_path, capsys):
    """The hint said only 'model.learn_sigma: true', which cannot load these weights; then the convert passed and
    zoo sample refused the recipe's learned DDPM variance."""
    g = golden("dit_tiny")
    official = {**g["state_dict"], "final_layer.linear.weight": torch.zeros(16, 64),
                "final_layer.linear.bias": torch.zeros(16)}  # p²·C rows: learn_sigma=False
    model = {k: v for k, v in g["config"].items() if k != "learn_sigma"}
    recipe_file = recipe(tmp_path, "dit", {**model, "learn_sigma": False}, **LABELS)
    assert convert(tmp_path, "dit", official, recipe_file) == 2
    assert "diffusion.objective: eps_mse" in last_error(capsys)
    assert convert(tmp_path, "dit", official, recipe_file, "--set", "diffusion.objective=eps_mse") == 2
    assert last_error(capsys) == (
        "zoo: error: key sample.solver.variance: ddpm variance 'learned' reads the model's variance output, and this "
        "model has none (model.learn_sigma is false) (--set sample.solver.variance=fixed_small (DDPM's own), or "
        "fixed_large)")
    assert convert(tmp_path, "dit", official, recipe_file, "--set", "diffusion.objective=eps_mse",
                   "--set", "sample.solver.variance=fixed_small") == 0
