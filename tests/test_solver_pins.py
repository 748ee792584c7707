"""Pins on the solvers' arithmetic that mutation testing found unpinned (a changed coefficient, sign or
threshold passed every other test): each test compares the step, the loop or the table against a
float64 reference written from the equations
(tests/official_dpm_solver.py: DPM-Solver / DPM-Solver++ in Taylor form, multistep order 3, the
adaptive step size algorithm, DDIM) or against a hand formula.

Tolerances: both sides run in float64 on the same oracle; they differ by the rounding of
algebraically equal formulas, schedules and λ <-> t round trips (measured ≤ 3e-14 of the scale; the
adaptive test has its own tolerance, explained there).
``TOL`` = 1e-10 of the scale keeps a wide margin above that and lies orders of magnitude below what
each pinned mutation moves (3e-5 to 1 of the scale, measured, quoted per test).
"""

import pytest
import torch

import official_dpm_solver as ref
from zoo.solvers import build_schedule, build_solver
from zoo.solvers.dpm_solver_loop import multistep_orders
from zoo.solvers.oracles import GaussianMixtureOracle, GaussianOracle
from zoo.solvers.respacing import space_timesteps
from zoo.solvers.schedules import DiscreteSchedule, LinearSchedule

F64 = torch.float64
TOL = 1e-10
FORMS = {"dpm_solver": "noise", "dpm_solver++": "data"}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def vp():
    """zoo's continuous VP-SDE schedule (β0 = 0.1, β1 = 20) and the reference's same schedule."""
    return build_schedule("vp_linear"), ref.VPLinear()


@pytest.fixture(scope="module")
def mixture(vp):
    """A 3-component Gaussian mixture in 2-D (a nonlinear ε̂) and 6 starting points x_T."""
    sched, _ = vp
    oracle = GaussianMixtureOracle(sched, torch.tensor([0.5, 0.3, 0.2], dtype=F64),
                                   torch.tensor([[-1.5, 0.5], [1.0, 1.0], [0.5, -1.5]], dtype=F64),
                                   torch.tensor([0.3, 0.5, 0.2], dtype=F64))
    x_T = torch.randn(6, 2, dtype=F64, generator=torch.Generator().manual_seed(1))
    return oracle, x_T


def _float_time(oracle):
    """The oracle's ε̂ called as the references call a model: eps(x, u) with u a Python float."""
    return lambda x, u: oracle.eps(x, torch.full((x.shape[0],), u, dtype=F64))


def _close(actual, expected, tol=TOL):
    scale = expected.abs().max().item()
    err = (actual - expected).abs().max().item()
    assert err <= tol * scale, (err, scale)


# ---------------------------------------------------------------- Heun (solvers/euler.py)

def test_one_heun_step_is_the_trapezoid_of_its_two_slopes(vp, mixture):
    """Heun's corrector averaged the slopes as (d + 3·d')/4 and every test still passed."""
    sched, _ = vp
    oracle, x_T = mixture
    out = build_solver("heun", steps=1, skip="time_uniform").sample(oracle.eps, x_T, sched)
    # Hand formula (Karras et al. 2022, Algorithm 1) on x̃ = x/α, σ̃ = σ/α, dx̃/dσ̃ = ε̂(α·x̃, t),
    # one step from t = T = 1 to t = eps = 1e-3:
    eps = _float_time(oracle)
    (a0, s0, _), (a1, s1, _) = ref.coeffs(ref.VPLinear(), 1.0), ref.coeffs(ref.VPLinear(), 1e-3)
    step = s1 / a1 - s0 / a0
    d = eps(x_T, 1.0)
    euler = x_T / a0 + step * d
    d_next = eps(a1 * euler, 1e-3)
    expected = a1 * (x_T / a0 + step * 0.5 * (d + d_next))
    _close(out, expected)  # (d + 3d')/4 moves the sample by |d' − d|·|step|/4: 0.5 of the scale (measured)


def test_heun_is_second_order_and_euler_first():
    """Heun's corrector weighed the new slope 3/4 (first order) and no test measured the order."""
    sched = build_schedule("linear")
    oracle = GaussianOracle(sched, torch.tensor([0.5, -1.0, 0.0, 2.0], dtype=F64),
                            torch.tensor([0.3, 1.5, 0.05, 1.0], dtype=F64))
    x_T = torch.randn(16, 4, dtype=F64, generator=torch.Generator().manual_seed(0))
    exact = oracle.flow(x_T, sched.T, sched.eps)  # closed-form probability flow of Gaussian data

    def err(name, steps):
        return (build_solver(name, steps=steps).sample(oracle.eps, x_T, sched) - exact).square().mean().sqrt().item()

    # Error ratio NFE 40 -> 80 on the karras grid, measured: Heun 4.21 (second order: 4), Euler 1.97 (first
    # order: 2). Heun with (d + 3d')/4 is first order but still pre-asymptotic here: 3.61, 3.14, 2.63 at
    # NFE 10 -> 20, 20 -> 40, 40 -> 80 (hence not NFE 10 -> 20). 3.5 splits 4.21 from 2.63.
    assert err("heun", 20) / err("heun", 40) > 3.5
    assert err("euler", 40) / err("euler", 80) < 2.5


# ---------------------------------------------------------------- DPM-Solver(++) singlestep, solver_type='taylor'

def test_the_taylor_reference_agrees_with_the_release_reference(vp, mixture):
    """The new reference's singlestep ('dpmsolver' type) reproduces the release's DPM-Solver++ loop (the reference checks itself)."""
    _, ns = vp
    oracle, x_T = mixture
    eps = _float_time(oracle)
    new = ref.singlestep_time_uniform(eps, ns, "data", x_T, 12, 3, 1e-3, "dpmsolver")
    _close(new, ref.dpm_solver_pp_fast(eps, ns, x_T, 12, 1e-3))


@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("name", ["dpm_solver", "dpm_solver++"])
def test_singlestep_taylor_follows_the_taylor_expansion(vp, mixture, name, order):
    """The 'taylor' singlestep updates (orders 2 and 3, noise and data forms) had a coefficient halved or a sign flipped unseen."""
    sched, ns = vp
    oracle, x_T = mixture
    # 12 NFE on a 12-interval time-uniform grid: order 2 is six order-2 steps, order 3 is [3, 3, 3, 2, 1]
    # (its order-2 step is pinned too); r1, r2 are not 1/2, 1/3, 2/3 here (uniform in t, not in λ).
    solver = build_solver(name, steps=12, order=order, method="singlestep", skip="time_uniform", solver_type="taylor")
    out = solver.sample(oracle.eps, x_T, sched)
    expected = ref.singlestep_time_uniform(_float_time(oracle), ns, FORMS[name], x_T, 12, order, 1e-3, "taylor")
    assert solver.nfe == 12
    _close(out, expected)  # the mutations move it by 6e-2 to 1 of the scale (measured)


# ---------------------------------------------------------------- DPM-Solver(++) multistep order 3

@pytest.mark.parametrize("steps", [8, 12])
@pytest.mark.parametrize("name", ["dpm_solver", "dpm_solver++"])
def test_multistep_order_3_on_a_grid_not_uniform_in_lambda(vp, mixture, name, steps):
    """3M's weights r0/(r0 + r1) and 1/(r0 + r1) were only tested where r0 = r1 (λ-uniform grid), so swapping them passed."""
    sched, ns = vp
    oracle, x_T = mixture
    out = build_solver(name, steps=steps, order=3, skip="time_uniform").sample(oracle.eps, x_T, sched)
    expected = ref.multistep_time_uniform(_float_time(oracle), ns, FORMS[name], x_T, steps, 3, 1e-3)
    # the grid is uniform in t: consecutive λ-steps differ (r0 ≠ r1), or the test would not see the weights
    lam = [ref.coeffs(ns, 1.0 + (1e-3 - 1.0) * i / steps)[2] for i in range(steps + 1)]
    ratios = [(b - a) / (c - b) for a, b, c in zip(lam, lam[1:], lam[2:])]
    assert max(abs(r - 1.0) for r in ratios) > 0.1
    _close(out, expected)  # the mutations move it by 1.5e-4 to 1.3e-1 of the scale (measured)


def test_lower_order_final_stops_at_ten_steps(vp, mixture):
    """lower_order_final applied at exactly 10 steps (steps <= 10) and the order tables jumped from 5 to 12."""
    # DPM-Solver's rule: lower the final orders only for fewer than 10 steps
    assert multistep_orders(10, 3) == [1, 2] + [3] * 8
    assert multistep_orders(9, 3) == [1, 2] + [3] * 5 + [2, 1]
    assert multistep_orders(10, 2) == [1] + [2] * 9
    sched, ns = vp
    oracle, x_T = mixture
    out = build_solver("dpm_solver++", steps=10, order=3, skip="time_uniform").sample(oracle.eps, x_T, sched)
    _close(out, ref.multistep_time_uniform(_float_time(oracle), ns, "data", x_T, 10, 3, 1e-3))


# ---------------------------------------------------------------- adaptive step size

@pytest.mark.parametrize("name,order", [("dpm_solver", 3), ("dpm_solver++", 2), ("dpm_solver++", 3)])
def test_adaptive_steps_follow_the_papers_algorithm(vp, name, order):
    """The adaptive loop's θ (0.9 -> 0.8) and its x_prev (the lower-order solution, not the higher) changed unseen."""
    sched, ns = vp
    # Data of scale ~2-3 so that rtol·|x| (0.05·|x|) exceeds atol = 0.0078 and x_prev enters the tolerance.
    oracle = GaussianMixtureOracle(sched, torch.tensor([0.5, 0.5], dtype=F64),
                                   torch.tensor([[-2.0, 3.0], [2.5, 1.0]], dtype=F64), torch.tensor([0.4, 0.6], dtype=F64))
    x_T = torch.randn(4, 2, dtype=F64, generator=torch.Generator().manual_seed(2))
    solver = build_solver(name, order=order, method="adaptive")
    out = solver.sample(oracle.eps, x_T, sched)
    expected, nfe = ref.adaptive(_float_time(oracle), ns, FORMS[name], x_T, order, 1e-3)
    assert solver.nfe == nfe  # θ = 0.8 changes it in 2 of these 3 (and the sample by 1e-3 to 7e-3 of the scale)
    # Not TOL: the first trial step's E ~ 1e-8 comes from x_higher − x_lower cancelling to ~1e-10, so its
    # rounding (1e-16 of x) moves the next h by ~1e-8 relative (h ∝ E^(−1/order)) and the sample by up to
    # 9e-10 of the scale (measured, dpm_solver++ order 3; ≤ 3e-13 in the others). x_prev = x_higher moves
    # the sample by 3e-5 to 1.3e-4 of the scale (measured): 1e-7 is 100x from either.
    _close(out, expected, tol=1e-7)


# ---------------------------------------------------------------- respacing, DDIM, discrete betas

def test_ddim_n_of_n_keeps_every_step():
    """The 'ddimN' stride search started at stride 2, so 'ddim1000' (stride 1) of 1000 steps was refused."""
    assert space_timesteps(1000, "ddim1000") == list(range(1000))
    assert space_timesteps(10, "ddim10") == list(range(10))


def test_ddim_grid_with_a_tiny_eta_adds_its_noise(vp, mixture):
    """DDIM skipped the noise term for c <= 1e-3 (not only c = 0), so eta = 1e-4 sampled as eta = 0."""
    sched, ns = vp
    oracle, x_T = mixture
    out = build_solver("ddim_grid", steps=6, eta=1e-4).sample(oracle.eps, x_T, sched,
                                                              generator=torch.Generator().manual_seed(5))
    times = [1.0 + (1e-3 - 1.0) * i / 6 for i in range(7)]
    abars = [ref.coeffs(ns, u)[0] ** 2 for u in times]
    g = torch.Generator().manual_seed(5)
    expected = ref.ddim(_float_time(oracle), x_T, times[:-1], abars[:-1], abars[-1], 1e-4,
                        lambda: torch.randn(x_T.shape, generator=g, dtype=F64))
    _close(out, expected)  # without the noise term (c <= 1e-3 taken as 0): off by 7.5e-5 of the scale (measured)
    # the noise the 6 steps add moves the sample by 1.2e-4 (measured), far above TOL: the test sees it
    deterministic = ref.ddim(_float_time(oracle), x_T, times[:-1], abars[:-1], abars[-1], 0.0, None)
    assert (out - deterministic).abs().max().item() > 1e-7


def test_ddim_chain_with_a_tiny_eta_adds_its_noise():
    """DDIM on the respaced chain (ADM's ddim_sample_loop) dropped the noise of eta = 1e-4 (c <= 1e-3 was taken as 0)."""
    sched = build_schedule("linear")
    oracle = GaussianOracle(sched, torch.tensor([0.5, -1.0], dtype=F64), torch.tensor([0.3, 1.5], dtype=F64))
    x_T = torch.randn(4, 2, dtype=F64, generator=torch.Generator().manual_seed(3))
    out = build_solver("ddim", respacing="ddim10", eta=1e-4).sample(oracle.eps, x_T, sched,
                                                                    generator=torch.Generator().manual_seed(6))
    abar_all = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=F64), 0)  # DDPM's linear table
    kept = list(range(900, -1, -100))  # 'ddim10': stride 100 from step 0, walked noisiest first
    g = torch.Generator().manual_seed(6)
    expected = ref.ddim(_float_time(oracle), x_T, [(k + 1) / 1000 for k in kept], [abar_all[k].item() for k in kept],
                        1.0, 1e-4, lambda: torch.randn(x_T.shape, generator=g, dtype=F64))
    _close(out, expected)  # without the noise term: off by 1.1e-4 of the scale (measured)


def test_betas_of_a_table_given_by_alphas_cumprod_alone():
    """DiscreteSchedule built from ᾱ alone gave β_0 = 0 (it divided ᾱ_0 by itself, not by ᾱ_{−1} = 1)."""
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=F64)
    table = DiscreteSchedule(LinearSchedule().alphas_cumprod).betas
    assert table.dtype == F64
    # β_n = 1 − ᾱ_n/ᾱ_{n−1} recovers 1 − (1 − β_n)(1 + δ), |δ| a few ulps of 1 (cumprod and the division):
    # an absolute error of ~1e-16 per β (measured max 1.7e-16); 1e-14 is 60x that and 1e10 times below the
    # β_0 = 1e-4 that the mutation drops.
    assert (table - betas).abs().max().item() < 1e-14
