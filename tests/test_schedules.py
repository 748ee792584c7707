"""Noise schedules: DDPM / Stable Diffusion tables, DPM-Solver's continuous-time forms, inverses."""

import math

import numpy as np
import pytest
import torch

from zoo.solvers import build_schedule
from zoo.solvers.schedules import (CosineDiscreteSchedule, CosineSchedule, LinearSchedule, ScaledLinearSchedule,
                                   VPLinearSchedule)

F64 = torch.float64
ALL = ["linear", "scaled_linear", "vp_linear", "cosine", "cosine_discrete"]


def assert_near(actual, expected, rtol=1e-7, atol=1e-7):
    """|actual − expected| ≤ atol + rtol·|expected| everywhere (torch.testing's first call is slow)."""
    bad = (actual - expected).abs() > atol + rtol * expected.abs()
    assert not bool(bad.any()), f"max deviation {(actual - expected).abs().max().item():.3e}"


def test_registry_builds_each_schedule():
    assert isinstance(build_schedule("linear"), LinearSchedule)
    assert isinstance(build_schedule("scaled_linear"), ScaledLinearSchedule)
    assert isinstance(build_schedule("vp_linear", beta_0=0.1, beta_1=20.0), VPLinearSchedule)
    assert isinstance(build_schedule("cosine"), CosineSchedule)
    assert isinstance(build_schedule("cosine_discrete"), CosineDiscreteSchedule)


def test_linear_reproduces_ddpm_table():
    sched = build_schedule("linear", num_steps=1000, beta_start=1e-4, beta_end=0.02)
    abar = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))
    np.testing.assert_allclose(sched.alphas_cumprod.numpy(), abar, rtol=1e-13)
    assert sched.alphas_cumprod[-1].item() == pytest.approx(4.0358e-05, rel=1e-4)  # DDPM's ᾱ_T
    np.testing.assert_allclose(sched.betas.numpy(), np.linspace(1e-4, 0.02, 1000), rtol=1e-10)
    assert (sched.num_steps, sched.T, sched.eps) == (1000, 1.0, 1e-3)


def test_scaled_linear_reproduces_stable_diffusion_table():
    sched = build_schedule("scaled_linear")
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    np.testing.assert_allclose(sched.alphas_cumprod.numpy(), np.cumprod(1.0 - betas), rtol=1e-13)
    assert sched.alphas_cumprod[-1].item() == pytest.approx(0.0046, abs=1e-4)


def test_cosine_discrete_reproduces_iddpm_table():
    """iDDPM's betas_for_alpha_bar(N, cos²((τ + 0.008)/1.008·π/2)), β capped at 0.999, written out per step."""
    sched = build_schedule("cosine_discrete", num_steps=1000)
    f = [math.cos((n / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2 for n in range(1001)]
    betas = np.array([min(1 - f[n + 1] / f[n], 0.999) for n in range(1000)])
    np.testing.assert_allclose(sched.betas.numpy(), betas, rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(sched.alphas_cumprod.numpy(), np.cumprod(1.0 - betas), rtol=1e-12)
    assert betas[-1] == 0.999 and betas[-2] < 0.999  # only the last step is capped
    assert sched.alphas_cumprod[-1].item() == pytest.approx(2.4288e-09, rel=1e-4)
    assert sched.marginal_lambda(torch.tensor(1.0, dtype=F64)).item() == pytest.approx(-9.918, abs=1e-3)
    # the point of the table: at 32x32 far fewer steps than DDPM's linear one sit at σ > 0.96
    sigma = (1 - sched.alphas_cumprod).sqrt()
    assert (sigma > 0.96).double().mean().item() == pytest.approx(0.183, abs=1e-3)


def test_dpm_solver_starts_a_table_reaching_below_lambda_minus_5_1_where_the_reference_cuts_it():
    """The reference's NoiseScheduleVP drops the last knots with λ < −5.1: iDDPM's cosine table loses 4 of
    1000 (λ(t=1) = −9.9), DDPM's linear one (λ = −5.06) and Stable Diffusion's none."""
    cosine = build_schedule("cosine_discrete")
    log_alpha = 0.5 * cosine.alphas_cumprod.log()
    lam = log_alpha - 0.5 * torch.log(1 - cosine.alphas_cumprod)
    cut = int((lam < -5.1).sum())
    assert cut == 4 and bool((lam[-cut:] < -5.1).all()) and lam[-cut - 1] >= -5.1
    assert cosine.stable_start() == (1000 - cut) / 1000 == 0.996  # the knot of step 995, the cut table's end
    assert build_schedule("linear").stable_start() == build_schedule("scaled_linear").stable_start() == 1.0
    assert build_schedule("cosine").stable_start() == build_schedule("cosine").T  # continuous: its own T


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "cosine_discrete"])
def test_a_one_step_table_is_refused_and_two_steps_sample(name):
    """A 1-step table was accepted and then failed inside the DDIM/DDPM solvers (an empty knot segment)."""
    from zoo.errors import UserError
    from zoo.solvers import build_solver

    with pytest.raises(UserError, match=r"key num_steps: num_steps must be an integer in \[2, 100000\]"):
        build_schedule(name, num_steps=1)
    sched = build_schedule(name, num_steps=2)
    x = torch.randn(2, 3, dtype=F64)
    for solver in ("ddim", "ddpm"):
        out = build_solver(solver, steps=2).sample(lambda x, t: torch.zeros_like(x), x, schedule=sched,
                                                   generator=torch.Generator().manual_seed(0))
        assert out.shape == x.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["linear", "scaled_linear"])
def test_a_table_whose_alpha_bar_underflows_is_refused_and_one_just_inside_keeps_its_exact_betas(name):
    """DDPM's betas over 72000 steps take ᾱ below float64's normal range at step 70999: β rebuilt from
    ᾱ was off by 2.7e-6 there (0 past ~75000 steps, refused with a wrong reason about the betas)."""
    from zoo.errors import UserError

    cls = LinearSchedule if name == "linear" else ScaledLinearSchedule
    with pytest.raises(UserError, match=r"key num_steps: ᾱ falls below float64's smallest normal number at step"):
        build_schedule(name, num_steps=100000, beta_start=1e-4, beta_end=0.02)
    with pytest.raises(ValueError, match="too many steps for these betas"):  # the class itself, without a recipe
        cls(100000, 1e-4, 0.02)
    # 70000 steps end at ᾱ = 2.6e-308: β recovered from ᾱ was off by 1e-12 relative; the table keeps its own.
    sched = build_schedule(name, num_steps=70000, beta_start=1e-4, beta_end=0.02)
    power = 1.0 if name == "linear" else 2.0
    betas = np.linspace(1e-4 ** (1 / power), 0.02 ** (1 / power), 70000) ** power
    np.testing.assert_allclose(sched.betas.numpy(), betas, rtol=1e-14, atol=0)
    with torch.device("meta"):  # recipes are validated while models build on meta: tables keep values
        on_meta = build_schedule(name, num_steps=70000, beta_start=1e-4, beta_end=0.02)
    assert torch.equal(on_meta.alphas_cumprod, sched.alphas_cumprod)


def test_discrete_time_is_piecewise_linear_log_alpha_between_knots():
    sched = LinearSchedule(num_steps=10)
    n = torch.arange(10)
    knots = (n + 1).to(F64) / 10
    half_log_abar = 0.5 * torch.log(sched.alphas_cumprod)
    assert_near(sched.marginal_log_mean_coeff(knots), half_log_abar, rtol=0, atol=1e-15)
    assert_near(sched.marginal_alpha(knots) ** 2, sched.alphas_cumprod, rtol=1e-13, atol=0)
    mid = knots[:-1] + 0.05
    assert_near(sched.marginal_log_mean_coeff(mid), (half_log_abar[:-1] + half_log_abar[1:]) / 2,
                               rtol=0, atol=1e-15)
    # below t = 1/N the first segment is extended (as DPM-Solver's interpolate_fn does)
    below = sched.marginal_log_mean_coeff(torch.tensor([0.0], dtype=F64))
    assert below.item() == pytest.approx((2 * half_log_abar[0] - half_log_abar[1]).item(), abs=1e-15)


def test_vp_linear_closed_form():
    sched = VPLinearSchedule(beta_0=0.1, beta_1=20.0)
    t = torch.linspace(1e-3, 1.0, 101, dtype=F64)
    expected = -0.25 * t**2 * 19.9 - 0.5 * t * 0.1
    assert_near(sched.marginal_log_mean_coeff(t), expected, rtol=0, atol=1e-15)
    # d log α / dt = −β(t)/2 with β(t) = 0.1 + 19.9 t
    dt = 1e-6
    slope = (sched.marginal_log_mean_coeff(t + dt) - sched.marginal_log_mean_coeff(t - dt)) / (2 * dt)
    assert_near(slope, -0.5 * (0.1 + 19.9 * t), rtol=1e-8, atol=1e-8)
    assert_near(sched.marginal_alpha(t) ** 2 + sched.marginal_std(t) ** 2, torch.ones_like(t))


def test_cosine_closed_form():
    sched = CosineSchedule()
    s = 0.008
    t = torch.linspace(1e-3, sched.T, 101, dtype=F64)
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    assert_near(sched.marginal_alpha(t) ** 2, f / math.cos(s / (1 + s) * math.pi / 2) ** 2)
    assert sched.T == 0.9946 and sched.eps == 1e-3
    # Training draws t down to 0 (a logit-normal time reaches 1e-17): σ there is 0, not NaN (the two
    # logs rounded to log α = +1e-20 and σ = √(1 − α²) to NaN, a NaN loss at a random step).
    tiny = torch.tensor([0.0, 1e-17, 1e-16], dtype=F64)
    assert torch.equal(sched.marginal_std(tiny).abs(), torch.zeros(3, dtype=F64))


@pytest.mark.parametrize("name", ALL)
def test_inverse_lambda_inverts_marginal_lambda(name):
    sched = build_schedule(name)
    t = torch.linspace(sched.eps, sched.T, 2001, dtype=F64)
    lam = sched.marginal_lambda(t)
    assert bool((lam[1:] < lam[:-1]).all()), "λ must decrease with t"
    assert_near(sched.inverse_lambda(lam), t, rtol=0, atol=1e-12)
    alpha, sigma = sched.marginal_alpha(t), sched.marginal_std(t)
    assert_near(lam, torch.log(alpha) - torch.log(sigma), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ALL)
def test_dtype_and_shape_follow_the_input(name):
    sched = build_schedule(name)
    t32 = torch.full((3, 2), 0.5, dtype=torch.float32)
    for fn in (sched.marginal_alpha, sched.marginal_std, sched.marginal_lambda):
        out = fn(t32)
        assert out.dtype == torch.float32 and out.shape == (3, 2)
    assert sched.inverse_lambda(torch.zeros(4, dtype=F64)).dtype == F64
    assert sched.marginal_alpha(0.5).dtype == F64  # Python floats are computed in float64
