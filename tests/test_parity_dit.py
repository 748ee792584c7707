"""DiT against the official facebookresearch/DiT outputs (tests/golden/golden_dit_tiny.pt)."""

from __future__ import annotations

from pathlib import Path

import copy

import pytest
import torch
from numerics import dit_cfg_budget, fixed_sinusoid, golden_features, propagated_bound

from zoo.errors import UserError
from zoo.parity import build_official_model, run_parity

GOLDEN = Path(__file__).parent / "golden" / "golden_dit_tiny.pt"


@pytest.fixture(scope="module")
def golden():
    return torch.load(GOLDEN, weights_only=True)


@pytest.fixture(scope="module")
def model(golden):
    return build_official_model("dit", golden["config"], golden["state_dict"])


def _features(golden, t):
    aux = golden["aux"]
    return golden_features(aux["timestep_embedding_t"], aux["timestep_embedding_dim256"], t, 256)


@pytest.fixture(scope="module")
def budget(golden, model):
    """The generator's time features for the golden inputs, and the output error they may carry.

    ``aux`` holds the generator's features for t = 0, 1, 999 (3 of the 4 samples); for t = 500
    we use ours, which another CPU may compute up to ``sinusoid_bound`` away (tests/numerics.py),
    carried to the outputs in float64. Everything else is float arithmetic of the forward.
    """
    x, t, y = (golden["inputs"][k] for k in ("x", "t", "y"))
    features, delta = _features(golden, t)
    (bound,) = propagated_bound(copy.deepcopy(model).double(), (x.double(), t, y), features, delta)
    return features, bound


def test_parity_fp32():
    result = run_parity(GOLDEN)  # family inferred from the file name
    assert result.family == "dit" and result.passed, result  # max abs 1e-6 here, 6e-5 with sin/cos 1 ulp off


def test_a_golden_file_of_another_family_and_a_ddp_prefix(tmp_path, golden):
    """--family uvit on a DiT golden file said "unknown U-ViT config keys [...]", and a golden file saved from a
    DDP model ('module.pos_embed') was refused as unexpected keys, which zoo convert strips."""
    with pytest.raises(UserError, match="holds dit weights, not uvit ones") as info:
        run_parity(GOLDEN, family="uvit")
    assert info.value.suggestion == "pass --family dit, or leave --family out"
    wrapped = {**golden, "state_dict": {f"module.{k}": v for k, v in golden["state_dict"].items()}}
    torch.save(wrapped, tmp_path / "golden_dit_ddp.pt")
    assert run_parity(tmp_path / "golden_dit_ddp.pt").max_abs == run_parity(GOLDEN).max_abs


def test_parity_fp64(golden, model, budget):
    assert run_parity(GOLDEN, "dit", dtype=torch.float64).passed
    features, bound = budget
    x, t, y = (golden["inputs"][k] for k in ("x", "t", "y"))
    with torch.no_grad(), fixed_sinusoid(features):
        out64 = copy.deepcopy(model).double()(x.double(), t, y)
    # Float64 round-off of this forward is ~1e-15; the rest is the t = 500 sample's features.
    assert ((out64 - golden["outputs_fp64"]).abs() <= 1e-12 + bound).all()
    assert (out64 - golden["outputs_fp64"])[[0, 1, 3]].abs().max() < 1e-12  # the samples whose features we hold


def test_outputs_match_fused_attention_reference(golden, model, budget):
    features, bound = budget
    with torch.no_grad(), fixed_sinusoid(features):
        out = model(golden["inputs"]["x"], golden["inputs"]["t"], golden["inputs"]["y"])
    assert out.shape == (4, 8, 16, 16)
    # Float32 forward vs float32 golden: both are ~1.7e-6 from the float64 result (the golden file's
    # max_abs_diff_fp32_vs_fp64; ours measured the same), so 1e-5 leaves 3x margin for another CPU's
    # accumulation order; plus the features' propagated error on the t = 500 sample.
    assert ((out - golden["outputs_sdpa_fp32"]).abs() <= 1e-5 + bound).all()
    assert ((out - golden["outputs"]).abs() <= 1e-5 + bound).all()


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


@pytest.fixture(scope="module")
def cfg_budget():
    return dit_cfg_budget()  # shared with tests/test_guidance.py, computed once


def test_cfg_semantics(golden, model, cfg_budget):
    case = golden["cfg_test"]
    x, t, y, s = (case["inputs"][k] for k in ("x", "t", "y", "cfg_scale"))
    features, bound = cfg_budget
    with torch.no_grad(), fixed_sinusoid(features):
        out = _dit_cfg(model, x, t, y, s)
        out64 = _dit_cfg(copy.deepcopy(model).double(), x.double(), t, y, s)
    # Guidance scale 4 multiplies the float32 forward's 1e-5 budget: (s + |1 - s|) / 2 = 3.5 times
    # the 1.7e-6 round-off of either pass is 6e-6 < 2e-5.
    assert ((out - case["outputs"]).abs() <= 2e-5 + bound).all()
    assert ((out64 - case["outputs_fp64"]).abs() <= 1e-12 + bound).all()
    # Channel 3 and the variance channels are NOT guided: the two halves differ there.
    assert torch.equal(case["outputs"][:2, :3], case["outputs"][2:, :3])
    assert not torch.allclose(case["outputs"][:2, 3:], case["outputs"][2:, 3:])


def test_cfg_through_guidance_wrapper(golden, model, cfg_budget):
    """The diffusion engineer's guidance reproduces the official rows it keeps (the conditional half)."""
    guidance = pytest.importorskip("zoo.diffusion.guidance")
    case = golden["cfg_test"]
    x, t, y, s = (case["inputs"][k] for k in ("x", "t", "y", "cfg_scale"))
    features, bound = cfg_budget
    guided = guidance.GuidedModel(
        model, time_map=lambda t: t, y=y[:2], scale=s, convention="dit", null_label=10, channels=3
    )
    with torch.no_grad(), fixed_sinusoid(features):
        out = guided.full_output(x[:2], t[:2])
    assert ((out - case["outputs"][:2]).abs() <= 2e-5 + bound[:2]).all()


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
    assert last.startswith("max abs error") and abs_err <= 1e-4 and rel_err <= abs_err  # max |output| > 1
    assert main(["parity", str(GOLDEN), "--family", "dit", "--fp64"]) == 0
    assert main(["parity", "no_such_golden.pt"]) == 2
    assert "golden file no_such_golden.pt does not exist" in capsys.readouterr().err


def test_parity_command_fails_above_tolerance(tmp_path, golden, capsys):
    from zoo.cli import main

    bad = dict(golden, outputs=golden["outputs"] + 1e-3)
    torch.save(bad, tmp_path / "golden_dit_shifted.pt")
    assert main(["parity", str(tmp_path / "golden_dit_shifted.pt")]) == 1
    out = capsys.readouterr().out
    # The shift plus or minus the unshifted error, which is <= the 1e-4 threshold on any CPU.
    assert "FAIL" in out and 0.9e-3 <= float(out.strip().splitlines()[-1].split()[3]) <= 1.1e-3
    # NaN outputs fail too (max(0.0, nan) is 0.0: NaN outputs used to pass with error 0)
    weights = {k: v * float("nan") if k == "final_layer.linear.bias" else v for k, v in golden["state_dict"].items()}
    torch.save(dict(golden, state_dict=weights), tmp_path / "golden_dit_nan_model.pt")
    assert main(["parity", str(tmp_path / "golden_dit_nan_model.pt")]) == 1
    assert "FAIL" in capsys.readouterr().out
    # NaN expected outputs are a broken golden file, not a failed comparison ("max abs error inf")
    torch.save(dict(golden, outputs=golden["outputs"] * float("nan")), tmp_path / "golden_dit_nan.pt")
    assert main(["parity", str(tmp_path / "golden_dit_nan.pt")]) == 2
    assert "the golden file's expected outputs hold NaN or inf" in capsys.readouterr().err


def test_golden_inputs_that_do_not_fit_the_model_are_one_line(tmp_path, golden, capsys):
    from zoo.cli import main

    inputs = golden["inputs"]
    for name, bad in (("label", dict(inputs, y=inputs["y"] + 5)), ("channels", dict(inputs, x=inputs["x"][:, :3])),
                      ("list", [1, 2])):
        torch.save(dict(golden, inputs=bad), tmp_path / f"golden_dit_{name}.pt")
        assert main(["parity", str(tmp_path / f"golden_dit_{name}.pt")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"golden_dit_{name}.pt" in err, err
