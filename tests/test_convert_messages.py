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
UVIT_DATA = {"num_classes": 10, "image_size": 128, "latent": True}  # 4 channels: latents of 128 px images
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


# -- keys that do not fit, named as the official file names them -------------------------------------------


def released_keys(name: str) -> tuple[dict[str, torch.Tensor], dict | None]:
    data = json.loads((GOLDEN / "keys" / f"{name}.json").read_text())
    shapes, config = data.get("keys", data), data.get("_config")
    return {k: torch.empty(v, device="meta") for k, v in shapes.items() if not k.startswith("_")}, config


@pytest.mark.parametrize("family, source", [
    ("dit", "dit_tiny"), ("uvit", "uvit_tiny"), ("dimr", "dimr_tiny_r2"), ("dimr", "dimr_tiny_r3"),
    ("dit", "keys:dit_xl_2"), ("uvit", "keys:uvit_m_4"), ("dimr", "keys:dimr_xl_2r"), ("dimr", "keys:dimr_g_2r"),
])  # fmt: skip
def test_official_keys_inverts_the_conversion(family, source):
    """Every zoo key names exactly the official keys it is converted from (a DiT adaLN half its whole, DiMR's fused
    fc1 both GeGLU halves)."""
    from zoo.convert import get_family

    converter = get_family(family)
    if source.startswith("keys:"):
        state, config = released_keys(source[5:])
    else:
        g = golden(source)
        state, config = g["state_dict"], g["config"]
    sources: dict[str, set[str]] = {}
    for key, value in state.items():
        if family == "dimr":  # one GeGLU half alone does not convert
            sources.setdefault(converter.zoo_key(key, config)[0], set()).add(key)
        else:
            for name in converter.convert_state_dict({key: value}, config):
                sources.setdefault(name, set()).add(key)
    assert {name: set(converter.official_keys(name, config)) for name in sources} == sources


@pytest.mark.parametrize("source, drop, named", [
    ("uvit_tiny", "out_blocks.0.skip_linear.weight", "missing keys: out_blocks.0.skip_linear.weight ("),
    ("dit_tiny", "blocks.0.adaLN_modulation.1.weight", "missing keys: blocks.0.adaLN_modulation.1.weight ("),
    ("dimr_tiny_r2", "stages.0.blocks.0.block1.norm.scale.nodecay_bias",
     "missing keys: stages.0.blocks.0.block1.norm.scale.nodecay_bias ("),
])  # fmt: skip
def test_a_missing_official_key_is_named_as_in_the_file(tmp_path, capsys, source, drop, named):
    """They were named by zoo's keys (blocks.skip_linears.0.weight; a DiT adaLN as two norm keys), not in the file."""
    family, model = {"uvit_tiny": ("uvit", UVIT_MODEL), "dit_tiny": ("dit", golden("dit_tiny")["config"]),
                     "dimr_tiny_r2": ("dimr", DIMR_R2_MODEL)}[source]  # fmt: skip
    sections = {"data": UVIT_DATA} if family == "uvit" else LABELS
    state = {k: v for k, v in golden(source)["state_dict"].items() if k != drop}
    assert convert(tmp_path, family, state, recipe(tmp_path, family, model, **sections)) == 2
    err = last_error(capsys)
    assert named in err and "use the recipe of this checkpoint's model, or pass its official config as --config" in err


def test_a_mis_shaped_key_names_the_official_key_and_the_converted_one(tmp_path, capsys):
    g = golden("dimr_tiny_r2")
    model = {**DIMR_R2_MODEL, "in_channels": 3}
    assert convert(tmp_path, "dimr", g["state_dict"], recipe(tmp_path, "dimr", model, **LABELS)) == 2
    assert ("wrong shape keys: stages.0.input_layer.1.weight → branches.0.patch_embed.weight (32, 4, 2, 2) "
            "(model: (32, 3, 2, 2))") in last_error(capsys)


def test_a_dit_of_another_resolution_is_told_its_input_size(tmp_path, capsys):
    """DiT's sin-cos table is saved (a frozen parameter): its length is the checkpoint's token count."""
    from zoo.backbones.common import sincos_pos_embed_2d

    g = golden("dit_tiny")  # input_size 16, patch 2: 64 positions
    state = {**g["state_dict"], "pos_embed": sincos_pos_embed_2d(64, 16).reshape(1, 256, 64).float()}
    recipe_file = recipe(tmp_path, "dit", g["config"], **LABELS)
    assert convert(tmp_path, "dit", state, recipe_file) == 2
    assert last_error(capsys) == (
        "zoo: error: key model.input_size: the checkpoint's pos_embed has 256 positions and the model 64: it is a DiT "
        "for model.input_size 32 (16x16 patches of 2, 256px images) (--set model.input_size=32 --set "
        "data.image_size=256)")
    assert convert(tmp_path, "dit", state, recipe_file, "--set", "model.input_size=32",
                   "--set", "data.image_size=256") == 0


def test_paths_given_with_a_tilde_are_under_home(tmp_path, capsys, monkeypatch):
    """bash leaves `--out=~/c` and `--config=~/config.json` as they are: IN, --config and --out are expanded."""
    g = golden("uvit_tiny")
    torch.save(g["state_dict"], tmp_path / "official.pt")
    (tmp_path / "config.json").write_text(json.dumps(g["config"]))
    recipe_file = recipe(tmp_path, "uvit", UVIT_MODEL, data=UVIT_DATA)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert main(["convert", "uvit", "~/official.pt", "--recipe", str(recipe_file), "--config=~/config.json",
                 "--out=~/ckpt"]) == 0, capsys.readouterr().err
    assert (tmp_path / "ckpt" / "config.json").is_file() and not (tmp_path / "~").exists()
    (tmp_path / "afile.txt").write_text("keep")
    assert main(["convert", "uvit", "~/official.pt", "--recipe", str(recipe_file), "--out=~/afile.txt/c"]) == 2
    assert f"{tmp_path / 'afile.txt'} is a file, not a directory" in last_error(capsys)
