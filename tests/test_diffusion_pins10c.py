"""Pins on diffusion numbers no other test held exactly: the logit-normal time sampling's discrete
index ⌊u·N⌋ and its clamp to the last knot, the β-schedule refusal of β = 1, and DiMR's multi-scale
target refusing a noise map whose two sides pool by different factors.

Each was found by mutation testing: the existing tests passed with the rule broken (the logit-normal
CDF test compares distributions within sampling error, so a half-step shift or one stray index
beyond N does not show there)."""

from __future__ import annotations

import pytest
import torch

from zoo.diffusion.discrete import DiscreteDiffusion
from zoo.diffusion.multiscale import multiscale_target
from zoo.diffusion.time_sampling import TimeSampling

pytestmark = pytest.mark.usefixtures("one_thread")

N = 1000


def test_logit_normal_discrete_index_is_the_floor_of_u_times_n():
    """u in [k/N, (k+1)/N) is DDPM index k (time (k+1)/N): rounding u·N instead would shift every draw half a
    step towards high noise (and send u ≥ 1 − 1/(2N) to the clamp)."""
    ln = TimeSampling("logit_normal")
    u = torch.tensor([0.0, 0.0004, 0.0015, 0.0019999, 0.5004, 0.9996], dtype=torch.float64)
    t = ln.to_time(u, N, continuous=False)
    expected = torch.tensor([1, 1, 2, 2, 501, 1000], dtype=torch.float64) / N
    assert t.dtype == torch.float64
    assert torch.equal(t, expected)


def test_logit_normal_discrete_times_never_pass_one():
    """u = sigmoid(m + s·z) rounds to exactly 1.0 in float64 for m + s·z ≳ 37: that u·N = N must clamp to the
    last index N − 1 (time 1); unclamped it would be the knot (N + 1)/N, a noise level beyond the schedule."""
    ln = TimeSampling("logit_normal", mean=60.0, std=1.0)
    assert torch.equal(ln.to_time(torch.tensor([1.0], dtype=torch.float64), N, False),
                       torch.ones(1, dtype=torch.float64))
    t = ln.draw((64,), N, False, generator=torch.Generator().manual_seed(0))
    assert torch.equal(t, torch.ones(64, dtype=torch.float64))


def test_a_beta_of_one_is_refused():
    """β = 1 makes ᾱ zero from that step on, so √(1/ᾱ) and the posterior coefficients are inf/nan: the schedule
    must be refused up front, not turned into nan losses at the last step."""
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        DiscreteDiffusion(torch.tensor([0.1, 0.5, 1.0], dtype=torch.float64))
    DiscreteDiffusion(torch.tensor([0.1, 0.5, 0.999], dtype=torch.float64))  # just below 1 is a schedule


def test_multiscale_target_refuses_different_factors_per_side():
    """An 8x4 noise map pooled to 4x4 needs factor 2 on one side and 1 on the other: pooling both by H/h
    would return a 4x2 target (a wrong-shaped, wrongly scaled target for the branch), so it is refused."""
    eps = torch.randn(1, 2, 8, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="one integer factor"):
        multiscale_target(eps, (4, 4))
    assert multiscale_target(eps, (4, 2)).shape == (1, 2, 4, 2)  # one factor for both sides is fine


def test_multiscale_loss_refuses_more_coefficients_than_branches():
    """Three loss coefficients for a two-branch model (a recipe written for another DiMR) would be cut to the
    first two by zip: [1/16, 1/4] instead of the released [1/4, 1], weighting the model's own output by 1/4.
    The loss refuses any count mismatch, in both directions."""
    from zoo.diffusion.multiscale import multiscale_loss

    eps = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    outputs = [torch.zeros(2, 3, 2, 2, dtype=torch.float64), torch.zeros(2, 3, 4, 4, dtype=torch.float64)]
    with pytest.raises(ValueError, match="2 branch outputs but 3 loss coefficients"):
        multiscale_loss(outputs, eps, [1 / 16, 1 / 4, 1.0])
    with pytest.raises(ValueError, match="2 branch outputs but 1 loss coefficients"):
        multiscale_loss(outputs, eps, [1.0])
    loss = multiscale_loss(outputs, eps, [0.25, 1.0])
    low = (torch.nn.functional.avg_pool2d(eps, 2) * 2).pow(2).flatten(1).mean(1)
    assert (loss - (0.25 * low + eps.pow(2).flatten(1).mean(1))).abs().max() < 1e-12


def test_denoiser_maps_time_in_float64_and_returns_the_callers_precision():
    """The backbone's time input is computed in float64 and cast once: a float64 knot gives DiT's integer step (to
    1e-9), and a float32 knot gives float64's answer rounded to float32. Mapping in float32 instead rounds the
    subtraction 1000·(t − 1/N) at 259 of DiT's 1000 knots differently (steps off by ~3e-5 from the float64
    mapping the trainer used)."""
    from zoo.diffusion.denoiser import Denoiser
    from zoo.diffusion.time_input import dit_index

    denoiser = Denoiser(lambda x, t_in, y: t_in, lambda t: dit_index(t, N))
    knots = (torch.arange(N, dtype=torch.float64) + 1) / N
    x = torch.zeros(N, 1)
    exact = denoiser(x, knots)
    assert exact.dtype == torch.float64
    assert (exact - torch.arange(N, dtype=torch.float64)).abs().max() < 1e-9
    t32 = knots.float()
    got = denoiser(x, t32)
    assert got.dtype == torch.float32
    assert torch.equal(got, dit_index(t32.double(), N).float())
