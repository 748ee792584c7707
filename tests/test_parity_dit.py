"""DiT against the official facebookresearch/DiT outputs (tests/golden/golden_dit_tiny.pt)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from zoo.errors import UserError
from zoo.parity import build_official_model, run_parity

GOLDEN = Path(__file__).parent / "golden" / "golden_dit_tiny.pt"


@pytest.fixture(scope="module")
def golden():
    return torch.load(GOLDEN, weights_only=True)


@pytest.fixture(scope="module")
def model(golden):
    return build_official_model("dit", golden["config"], golden["state_dict"])


def test_parity_fp32():
    result = run_parity(GOLDEN)  # family inferred from the file name
    assert result.family == "dit" and result.passed
    assert result.max_abs < 1e-5, result


def test_parity_fp64():
    result = run_parity(GOLDEN, "dit", dtype=torch.float64)
    assert result.max_abs < 1e-12, result


def test_outputs_match_fused_attention_reference(golden, model):
    with torch.no_grad():
        out = model(golden["inputs"]["x"], golden["inputs"]["t"], golden["inputs"]["y"])
    assert out.shape == (4, 8, 16, 16)
    assert (out - golden["outputs_sdpa_fp32"]).abs().max() < 1e-5
    assert (out - golden["outputs"]).abs().max() < 1e-5


def _dit_cfg(model, x, t, y, scale: float) -> torch.Tensor:
    """The official ``forward_with_cfg`` rule, written from its documented semantics.

    Only the first half of the batch is used (duplicated): the model runs on
    ``[x[:B/2]; x[:B/2]]`` with the given ``t`` and ``y`` (cond labels then null labels);
    on channels 0..2 ``eps = u + s·(c − u)`` replaces both halves; channel 3 and the
    variance channels pass through unguided, each half keeping its own pass.
    """
    half = x[: len(x) // 2]
    out = model(torch.cat([half, half]), t, y)
    eps, rest = out[:, :3], out[:, 3:]
    cond, uncond = eps.chunk(2)
    guided = uncond + scale * (cond - uncond)
    return torch.cat([torch.cat([guided, guided]), rest], dim=1)


def test_cfg_semantics(golden, model):
    case = golden["cfg_test"]
    x, t, y, s = (case["inputs"][k] for k in ("x", "t", "y", "cfg_scale"))
    with torch.no_grad():
        out = _dit_cfg(model, x, t, y, s)
        assert (out - case["outputs"]).abs().max() < 2e-5
        out64 = _dit_cfg(model.double(), x.double(), t, y, s)
        model.float()
    assert (out64 - case["outputs_fp64"]).abs().max() < 1e-12
    # Channel 3 and the variance channels are NOT guided: the two halves differ there.
    assert torch.equal(case["outputs"][:2, :3], case["outputs"][2:, :3])
    assert not torch.allclose(case["outputs"][:2, 3:], case["outputs"][2:, 3:])


def test_cfg_through_guidance_wrapper(golden, model):
    """The diffusion engineer's guidance reproduces the official rows it keeps (the conditional half)."""
    guidance = pytest.importorskip("zoo.diffusion.guidance")
    case = golden["cfg_test"]
    x, t, y, s = (case["inputs"][k] for k in ("x", "t", "y", "cfg_scale"))
    guided = guidance.GuidedModel(
        model, time_map=lambda t: t, y=y[:2], scale=s, convention="dit", null_label=10, channels=3
    )
    with torch.no_grad():
        out = guided.full_output(x[:2], t[:2])
    assert (out - case["outputs"][:2]).abs().max() < 2e-5


def test_bad_golden_files_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        run_parity(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(UserError, match="cannot read"):
        run_parity(tmp_path / "junk.pt")
    torch.save({"config": {}}, tmp_path / "partial.pt")
    with pytest.raises(UserError, match="missing state_dict"):
        run_parity(tmp_path / "partial.pt")


def test_unknown_official_key_is_reported(golden):
    sd = dict(golden["state_dict"], **{"blocks.0.extra.weight": torch.zeros(1)})
    with pytest.raises(UserError, match="blocks.0.extra.weight"):
        build_official_model("dit", golden["config"], sd)


def test_parity_command(capsys):
    from zoo.cli import main

    assert main(["parity", str(GOLDEN)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    abs_err, rel_err = float(last.split()[3]), float(last.split()[7])
    assert last.startswith("max abs error") and abs_err < 1e-5 and rel_err < 1e-5
    assert main(["parity", str(GOLDEN), "--family", "dit", "--fp64"]) == 0
    assert main(["parity", "no_such_golden.pt"]) == 2
    assert "golden file no_such_golden.pt does not exist" in capsys.readouterr().err


def test_parity_command_fails_above_tolerance(tmp_path, golden, capsys):
    from zoo.cli import main

    bad = dict(golden, outputs=golden["outputs"] + 2e-4)
    torch.save(bad, tmp_path / "golden_dit_shifted.pt")
    assert main(["parity", str(tmp_path / "golden_dit_shifted.pt")]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and 1.9e-4 < float(out.strip().splitlines()[-1].split()[3]) < 2.1e-4
