"""Time maps from the solver's continuous t to each backbone's input."""

import math
from pathlib import Path

import pytest
import torch

from zoo.diffusion.time_input import (
    TIME_INPUTS,
    get_time_input,
    index_to_time,
    model_time,
    time_to_index,
    training_times,
)
from zoo.errors import UserError
from zoo.solvers import build_schedule

GOLDEN = Path(__file__).parent / "golden"
N = 1000


def _t(*values):
    return torch.tensor(values, dtype=torch.float64)


def test_endpoints():
    first, last = 1.0 / N, 1.0  # the solver runs from t = 1 down to t = 1/N
    assert model_time("dit_index", _t(first, last), N).tolist() == pytest.approx([0.0, 999.0], abs=1e-9)
    assert model_time("uvit_discrete", _t(first, last), N).tolist() == pytest.approx([1.0, 1000.0], abs=1e-9)
    assert model_time("uvit_continuous", _t(0.0, last), N).tolist() == pytest.approx([0.0, 999.0], abs=1e-9)
    assert model_time("dimr_log_snr", _t(first, last), N).tolist() == pytest.approx([-3.992, 4.0], abs=1e-9)


def test_knots_map_to_official_training_steps():
    """At the knot of 0-based DDPM index n: DiT sees n, U-ViT/DiMR the official 1-based step n+1."""
    index = torch.arange(N)
    t = index_to_time(index, N)
    assert torch.equal(model_time("dit_index", t, N).round().long(), index)
    assert torch.allclose(model_time("dit_index", t, N), index.double(), atol=1e-9)
    assert torch.allclose(model_time("uvit_discrete", t, N), index.double() + 1, atol=1e-9)
    assert torch.allclose(model_time("dimr_log_snr", t, N), 8 * (index.double() + 1) / 1000 - 4, atol=1e-12)
    assert torch.equal(time_to_index(t, N), index)


@pytest.mark.parametrize("steps", [10, 100, 4000])
def test_another_schedule_length_keeps_the_range_the_network_was_built_for(steps):
    """The official models use N = 1000. DiMR's 8·n/1000 − 4 reached 28 at iDDPM's N = 4000 (its
    time-dependent norms, scaled for [−4, 4], saturated from the middle of the chain on) and covered only
    −3.92..−3.2 at N = 100, a nearly time-blind model; U-ViT's step reached 4000. Like dit_index, the
    discrete maps give the 1000-step range for every N."""
    index = torch.arange(steps)
    t = index_to_time(index, steps)
    n = index.double() + 1
    assert torch.allclose(model_time("dimr_log_snr", t, steps), 8 * n / steps - 4, atol=1e-12)
    assert torch.allclose(model_time("uvit_discrete", t, steps), 1000 * n / steps, atol=1e-9)
    assert model_time("dimr_log_snr", t, steps)[-1].item() == pytest.approx(4.0, abs=1e-12)
    assert model_time("uvit_discrete", t, steps)[-1].item() == pytest.approx(1000.0, abs=1e-9)
    assert model_time("dit_index", t, steps)[-1].item() == pytest.approx(1000 - 1000 / steps, abs=1e-9)


def test_the_official_schedule_length_gives_the_official_values_to_the_bit():
    """At N = 1000 the maps are the official samplers' arithmetic exactly: N·t (U-ViT), N·t/1000·8 − 4 (DiMR)."""
    for dtype in (torch.float32, torch.float64):
        t = torch.rand(4096, generator=torch.Generator().manual_seed(0), dtype=dtype)
        assert torch.equal(model_time("uvit_discrete", t, N), N * t)
        assert torch.equal(model_time("dimr_log_snr", t, N), (N * t) / 1000.0 * 8.0 - 4.0)


def test_dimr_map_matches_golden_log_snr():
    """The golden file's official inputs: log_snr = 8n/1000 − 4 for its DDPM steps n in 1..1000."""
    g = torch.load(GOLDEN / "golden_dimr_tiny_r2.pt", weights_only=True)
    n = g["inputs"]["n"].double()
    ours = model_time("dimr_log_snr", n / N, N).float()
    assert torch.allclose(ours, g["inputs"]["log_snr"], atol=1e-6)


def test_maps_pair_model_step_with_the_solvers_noise_level():
    """The noise level the solver assigns to t equals ᾱ of the training step the model is told.

    DDPM ᾱ tables written out independently: DiT indexes ᾱ_0..ᾱ_999 (0-based), U-ViT/DiMR keep a
    table with ᾱ = 1 prepended and index it with n in 1..1000.
    """
    betas = torch.linspace(1e-4, 0.02, N, dtype=torch.float64)
    abar0 = torch.cumprod(1 - betas, 0)  # DiT: abar0[n], n = 0..999
    abar1 = torch.cat([torch.ones(1, dtype=torch.float64), abar0])  # U-ViT/DiMR: abar1[n], n = 1..1000
    sched = build_schedule("linear", num_steps=N, beta_start=1e-4, beta_end=0.02)
    t = index_to_time(torch.tensor([0, 1, 17, 499, 998, 999]), N)
    solver_abar = sched.marginal_alpha(t.float()).double() ** 2
    dit = model_time("dit_index", t, N).round().long()
    uvit = model_time("uvit_discrete", t, N).round().long()
    dimr = ((model_time("dimr_log_snr", t, N) + 4) * 1000 / 8).round().long()
    for table, step in ((abar0, dit), (abar1, uvit), (abar1, dimr)):
        assert torch.allclose(table[step], solver_abar, rtol=1e-5)


def test_training_times_discrete_are_knots_and_cover_all_steps():
    g = torch.Generator().manual_seed(0)
    t = training_times(50_000, N, generator=g)
    assert t.dtype == torch.float64
    index = model_time("dit_index", t, N)
    assert (index - index.round()).abs().max() < 1e-9
    assert torch.equal(index.float(), index.float().round())  # the model (float32) sees whole steps
    assert index.min() == 0 and index.max() == N - 1
    assert abs(index.mean().item() - (N - 1) / 2) < 5
    again = training_times(50_000, N, generator=torch.Generator().manual_seed(0))
    assert torch.equal(t, again)


def test_training_times_continuous():
    t = training_times(10_000, N, continuous=True, t_min=1e-3, generator=torch.Generator().manual_seed(1))
    assert t.min() >= 1e-3 and t.max() <= 1.0
    assert len(torch.unique(t)) > 9_000  # not snapped to knots
    assert abs(t.mean().item() - (1 + 1e-3) / 2) < 0.02


def test_all_maps_are_listed_and_typos_are_user_errors():
    assert set(TIME_INPUTS) == {"dit_index", "uvit_discrete", "uvit_continuous", "dimr_log_snr"}
    with pytest.raises(UserError, match="dimr_log_snr"):
        get_time_input("dimr_logsnr")


def test_maps_are_linear_in_t():
    """Every map is affine in t (solvers may call them with any t in [1/N, 1] and any dtype)."""
    t = torch.linspace(1 / N, 1, 7, dtype=torch.float32)
    for name, fn in TIME_INPUTS.items():
        y = fn(t, N)
        assert y.dtype == torch.float32, name
        slope = (y[1:] - y[:-1]) / (t[1:] - t[:-1])
        assert torch.allclose(slope, slope[0].expand_as(slope), rtol=1e-3), name
    assert math.isclose(TIME_INPUTS["dimr_log_snr"](torch.tensor(0.5), N).item(), 0.0, abs_tol=1e-6)


@pytest.mark.parametrize("recipe, wrong, fix", [("dimr_m_3r", "dit_index", "dimr_log_snr)"),
                                                ("uvit_h_2", "dimr_log_snr", "uvit_continuous, ...)"),
                                                ("dit_s_2", "dimr_log_snr", "dit_index, ...)")])
def test_a_time_input_on_another_scale_than_the_backbone_reads_is_refused(recipe, wrong, fix, capsys):
    """DiMR's time-dependent norms read τ = input/4: a DDPM index 0..999 (dit_index) saturated them (outputs at
    steps 500 and 900 differed by 9e-4 where log_snr gives 0.45); U-ViT's and DiT's scale a step by 1/500,
    which made DiMR's log-SNR almost no time at all. zoo build accepted both."""
    from zoo.cli import main

    assert main(["build", recipe, "--set", f"diffusion.time_input={wrong}"]) == 2
    err = capsys.readouterr().err
    assert f"key diffusion.time_input: diffusion.time_input {wrong} feeds " in err and err.count("\n") == 1
    assert f"(train with one it reads (--set diffusion.time_input={fix}; weights trained under {wrong} (zoo before " \
        "2026-12-07 accepted it) mean something only under it: sample them with that version)" in err
    assert "it takes " in err


@pytest.mark.parametrize("n", [50, 999, 1000, 4000])
def test_every_knot_maps_back_to_its_own_index_for_any_step_count(n):
    """t·N − 1 lands a rounding error away from the integer; floor instead of round loses knots
    (24 of 4000 at N = 4000, none at N = 1000), training those samples at the wrong noise level."""
    index = torch.arange(n)
    assert torch.equal(time_to_index(index_to_time(index, n), n), index)


def test_dimr_branch_embeddings_get_the_official_one_based_ddpm_step():
    """A DiMR branch with an embedding conditioner (adaLN-Zero, time token) embeds the DDPM step the
    log-SNR input came from: 1..1000 at the knots, exactly."""
    from zoo.backbones.dimr_branch import ddpm_step_from_log_snr

    index = torch.arange(N)
    log_snr = model_time("dimr_log_snr", index_to_time(index, N), N)
    assert torch.allclose(ddpm_step_from_log_snr(log_snr), (index + 1).to(torch.float32), atol=1e-3, rtol=0)
