"""Every paper recipe builds (on the meta device) with the parameter count and GFLOPs of the
official implementations (the paper's for the unreleased M/L/XL-3R).

Params are exact (``sum(p.numel())``); GFLOPs (MACs, attention included) within 0.1% of the
precise number. A missing recipe fails here on purpose: the table is the contract. DiT
recipes without an official count (``dit_{s,b,l,xl}_{2,4,8}[_512]``) are checked against DiT's closed form.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from zoo.flops import count_recipe_flops

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
TOLERANCE = 1e-3  # relative, on GFLOPs

# recipe, params (exact), GFLOPs (the official implementation's precise number)
PAPER = [
    ("dit_xl_2", 675_129_632, 118.6),
    ("dit_xl_2_512", 676_014_368, 524.6),
    ("dit_l_2", 458_102_816, 80.7),
    ("dit_b_2", 130_512_416, 23.0),
    ("dit_s_2", 32_963_360, 6.06),
    ("dit_xl_4", 675_074_432, 29.05),
    ("uvit_m_4", 130_940_292, 35.27),
    ("uvit_l_4", 286_827_652, 76.53),
    ("uvit_h_2", 500_832_016, 133.28),
    ("uvit_h_4", 500_942_656, 133.31),
    ("dimr_m_3r", 132_828_681, 53.58),
    ("dimr_l_3r", 284_138_505, 110.68),
    ("dimr_xl_2r", 505_046_408, 160.23),
    ("dimr_xl_3r", 525_027_372, 206.19),
    ("dimr_g_2r", 1_056_352_904, 331.19),
]

DIT_VARIANTS = {"s": (12, 384), "b": (12, 768), "l": (24, 1024), "xl": (28, 1152)}  # depth, width
DIT_NAME = re.compile(r"dit_(s|b|l|xl)_(2|4|8)(_512)?$")


def dit_closed_form(depth: int, D: int, p: int, latent: int, C: int = 4, classes: int = 1000) -> tuple[int, float]:
    """(params, GMACs) of an official DiT (learned sigma, 256-dim frequency embedding, 4× MLP)."""
    T = (latent // p) ** 2
    params = (
        depth * (18 * D * D + 15 * D)  # adaLN 6D, qkv 3D, proj D, MLP 8D (+ biases)
        + (2 * D * D + 2 * D) + (D * p * p * 2 * C + p * p * 2 * C)  # final adaLN + linear
        + (p * p * C * D + D) + (256 * D + D + D * D + D) + (classes + 1) * D + T * D  # embedders, pos table
    )
    macs = depth * (T * 12 * D * D + 2 * T * T * D + 6 * D * D) + 2 * D * D + T * D * p * p * 2 * C \
        + T * p * p * C * D + 256 * D + D * D
    return params, macs / 1e9


def _other_dit_recipes() -> list[tuple[str, int, float]]:
    listed = {name for name, _, _ in PAPER}
    rows = []
    for path in sorted(RECIPES.glob("dit_*.yaml")):
        match = DIT_NAME.match(path.stem)
        if match and path.stem not in listed:
            depth, width = DIT_VARIANTS[match[1]]
            rows.append((path.stem, *dit_closed_form(depth, width, int(match[2]), 64 if match[3] else 32)))
    return rows


@pytest.mark.parametrize("name, params, gflops", PAPER + _other_dit_recipes(), ids=lambda v: str(v))
def test_recipe_params_and_gflops(name, params, gflops):
    path = RECIPES / f"{name}.yaml"
    assert path.is_file(), f"recipe {path.name} is missing (a paper model)"
    report = count_recipe_flops(path)
    assert report.params == params, f"{name}: {report.params:,} params, expected {params:,}"
    assert report.gflops == pytest.approx(gflops, rel=TOLERANCE), f"{name}: {report.gflops:.3f} GFLOPs, expected {gflops}"


# zoo's default count (multiply-adds), to 3 decimals: --convention official leaves it as it was
MACS = {"dit_xl_2": 118.621, "dit_xl_2_512": 524.538, "dit_l_2": 80.698, "dit_b_2": 23.005, "dit_s_2": 6.056,
        "dit_xl_4": 29.044, "uvit_m_4": 35.236, "uvit_l_4": 76.473, "uvit_h_2": 133.197, "uvit_h_4": 133.225,
        "dimr_m_3r": 53.531, "dimr_l_3r": 110.596, "dimr_xl_2r": 160.176, "dimr_xl_3r": 206.072, "dimr_g_2r": 331.095}


@pytest.mark.parametrize("name, params, gflops", PAPER, ids=lambda v: str(v))
def test_official_convention_gives_the_official_figures(name, params, gflops):
    """`zoo build --flops --convention official`: U-ViT's and DiMR's precise official figures (stock fvcore +
    attention, LayerNorm included) to the 2nd decimal; DiT's are multiply-adds, the default count."""
    path = RECIPES / f"{name}.yaml"
    default = count_recipe_flops(path).gflops
    official = count_recipe_flops(path, convention="official").gflops
    assert round(default, 3) == MACS[name]
    if name.startswith("dit_"):
        assert official == default
    else:
        assert f"{official:.2f}" == f"{gflops:.2f}", f"{name}: {official:.4f} GFLOPs, official {gflops}"


@pytest.mark.parametrize("name", ["dit_xl_2", "dit_s_2", "dit_xl_4"])
def test_dit_closed_form_matches_paper_rows(name):
    """The closed form above is itself right: it reproduces the official DiT rows."""
    row = next(r for r in PAPER if r[0] == name)
    match = DIT_NAME.match(name)
    depth, width = DIT_VARIANTS[match[1]]
    params, gflops = dit_closed_form(depth, width, int(match[2]), 32)
    assert params == row[1] and gflops == pytest.approx(row[2], rel=TOLERANCE)


def _zoo_executable() -> str:
    """The installed ``zoo`` console script (beside this interpreter, else on PATH)."""
    beside = Path(sys.executable).parent / "zoo"
    found = str(beside) if beside.is_file() else shutil.which("zoo")
    assert found, "the zoo command is not installed (pip install -e .)"
    return found


def test_zoo_build_flops_json():
    result = subprocess.run(
        [_zoo_executable(), "build", str(RECIPES / "dit_s_2.yaml"), "--flops", "--json"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert isinstance(out["params"], int) and out["params"] == 32_963_360
    assert isinstance(out["trainable_params"], int) and out["trainable_params"] == 32_963_360 - 256 * 384
    assert isinstance(out["gflops"], float) and out["gflops"] == pytest.approx(6.06, rel=TOLERANCE)
