"""Solvers against exact answers: Gaussian data (closed-form probability flow) and a Gaussian mixture
(exact ε̂, reference flow from dopri5 in λ at rtol = atol = 1e-10), all in float64.

Also: DPM-Solver(++) against the k-diffusion forms of DPM++(2M), DPM++(2S) and DPM++(3M) written here
from their equations, DDIM = DPM-Solver-1 = Euler in σ, the reference's grids and order schedules,
the NFE of every method, ADM's respacing rule and its DDPM/DDIM loops written from their equations.
"""

import math
import re

import pytest
import torch

from zoo.errors import UserError
from zoo.solvers import build_schedule, build_solver
from zoo.solvers.base import time_grid
from zoo.solvers.respacing import space_timesteps
from zoo.solvers.dpm_solver import DPMSolver, DPMSolverPlusPlus
from zoo.solvers.dpm_solver_loop import multistep_orders, singlestep_orders
from zoo.solvers.oracles import GaussianMixtureOracle, GaussianOracle

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sched():
    return build_schedule("linear")


@pytest.fixture(scope="module")
def gauss(sched):
    oracle = GaussianOracle(sched, torch.tensor([0.5, -1.0, 0.0, 2.0], dtype=F64),
                            torch.tensor([0.3, 1.5, 0.05, 1.0], dtype=F64))
    x_T = torch.randn(16, 4, dtype=F64, generator=torch.Generator().manual_seed(0))
    return oracle, x_T, oracle.flow(x_T, sched.T, sched.eps)


@pytest.fixture(scope="module")
def mixture(sched):
    oracle = GaussianMixtureOracle(sched, torch.tensor([0.5, 0.3, 0.2], dtype=F64),
                                   torch.tensor([[-1.5, 0.5], [1.0, 1.0], [0.5, -1.5]], dtype=F64),
                                   torch.tensor([0.3, 0.5, 0.2], dtype=F64))
    x_T = torch.randn(16, 2, dtype=F64, generator=torch.Generator().manual_seed(1))
    torch.set_num_threads(1)
    reference = build_solver("ode", method="dopri5", rtol=1e-10, atol=1e-10).sample(oracle.eps, x_T, sched)
    return oracle, x_T, reference


def rms(a, b):
    return (a - b).square().mean().sqrt().item()


def assert_near(actual, expected, atol):
    """Max-abs comparison (torch.testing's first call costs seconds)."""
    assert (actual - expected).abs().max().item() <= atol, (actual - expected).abs().max().item()


def test_ode_reference_matches_the_closed_form_flow(sched, gauss):
    oracle, x_T, exact = gauss
    solver = build_solver("ode", rtol=1e-10, atol=1e-10)
    assert (solver.sample(oracle.eps, x_T, sched) - exact).abs().max().item() < 1e-8
    assert solver.nfe > 100



@pytest.mark.parametrize("method", ["euler", "midpoint", "heun2", "heun3", "rk4", "explicit_adams", "implicit_adams"])
def test_fixed_grid_ode_asks_for_the_end_alone_and_steps_the_same_grid(sched, gauss, monkeypatch, method):
    """odeint was given every grid point as an output time and returned all steps + 1 states
    (151 MiB at rk4 200 steps, batch 16, 3 x 64 x 64), of which the solver keeps the last."""
    import torchdiffeq

    oracle, x_T, _ = gauss
    odeint, calls = torchdiffeq.odeint, []

    def spy(func, y0, t, **kwargs):
        grid = kwargs["options"]["grid_constructor"](func, y0, t) if kwargs.get("options") else t
        full = odeint(func, y0, grid, rtol=kwargs["rtol"], atol=kwargs["atol"], method=kwargs["method"])
        calls.append((len(t), full[-1]))
        return odeint(func, y0, t, **kwargs)

    monkeypatch.setattr(torchdiffeq, "odeint", spy)
    out = build_solver("ode", method=method, steps=7).sample(oracle.eps, x_T, sched)
    (n_times, every_point_asked), = calls
    assert n_times == 2 and out.dtype == F64
    assert (out - every_point_asked).abs().max().item() == 0.0


def test_adaptive_ode_gets_no_grid(sched, gauss, monkeypatch):
    import torchdiffeq

    odeint, seen = torchdiffeq.odeint, []
    monkeypatch.setattr(torchdiffeq, "odeint",
                        lambda f, y0, t, **kw: seen.append((len(t), kw.get("options"))) or odeint(f, y0, t, **kw))
    build_solver("ode", rtol=1e-4, atol=1e-4).sample(gauss[0].eps, gauss[1], sched)
    assert seen == [(2, None)]


@pytest.mark.parametrize("schedule", ["linear", "cosine_discrete"])
def test_ode_network_never_sees_a_time_past_the_end(schedule):
    """dopri5 steps over the end and interpolates back; its evaluations past λ(t_end) used to
    reach t(λ) ≈ 1e-4, and on a model predicting v, σ(t) = 0 there (math domain error)."""
    sched, seen = build_schedule(schedule), []

    def eps(x, t):
        seen.append(float(t.flatten()[0]))
        return -10.0 * x  # a steep field: the last adaptive step overshoots the end

    solver = build_solver("ode", rtol=1e-2, atol=1e-2)
    out = solver.sample(eps, torch.randn(4, 4, dtype=F64, generator=torch.Generator().manual_seed(0)), sched)
    t_start, t_end = solver.time_range(sched)
    assert torch.isfinite(out).all()
    assert t_end - 1e-12 <= min(seen) and max(seen) <= t_start + 1e-12

# (name, kwargs) -> the error must fall as the NFE (10, 20, 50) grows; heun gets NFE/2 steps.
CONVERGING = [
    ("ddim_grid", {}), ("euler", {}), ("heun", {}),
    ("dpm_solver", dict(order=2, skip="logSNR")),
    ("dpm_solver", dict(order=3, skip="logSNR")),
    ("dpm_solver", dict(order=2, method="singlestep", skip="logSNR")),
    ("dpm_solver", dict(order=3, method="singlestep", skip="logSNR")),
    ("dpm_solver", dict(order=2, method="singlestep_fixed", skip="logSNR")),
    ("dpm_solver++", dict(order=2, skip="logSNR")), ("dpm_solver++", dict(order=3, skip="logSNR")),
    ("dpm_solver++", dict(order=3, method="singlestep", skip="logSNR")),
]


@pytest.mark.parametrize("oracle_name", ["gauss", "mixture"])
@pytest.mark.parametrize("name,kwargs", CONVERGING, ids=lambda v: v if isinstance(v, str) else "-".join(map(str, v.values())))
def test_error_falls_as_nfe_grows(request, sched, oracle_name, name, kwargs):
    oracle, x_T, reference = request.getfixturevalue(oracle_name)
    errors = []
    for nfe in (10, 20, 50):
        solver = build_solver(name, steps=nfe // 2 if name == "heun" else nfe, **kwargs)
        errors.append(rms(solver.sample(oracle.eps, x_T, sched), reference))
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < 0.4 * errors[0], errors


@pytest.mark.parametrize("oracle_name", ["gauss", "mixture"])
@pytest.mark.parametrize("name,order", [("dpm_solver", 2), ("dpm_solver", 3), ("dpm_solver++", 3), ("ode", None)])
def test_tolerance_driven_solvers_converge(request, sched, oracle_name, name, order):
    oracle, x_T, reference = request.getfixturevalue(oracle_name)
    errors, nfes = [], []
    for tol in ((1e-3, 1e-5) if name == "ode" else (1e-2, 1e-3)):
        kwargs = dict(rtol=tol, atol=tol) if name == "ode" else dict(order=order, method="adaptive", rtol=tol, atol=tol)
        solver = build_solver(name, **kwargs)
        errors.append(rms(solver.sample(oracle.eps, x_T, sched), reference))
        nfes.append(solver.nfe)
        if name != "ode":
            assert solver.nfe % order == 0  # every trial step costs `order` calls
    assert errors[0] > errors[1] and errors[1] < 5e-3, errors
    assert nfes[0] < nfes[1], nfes


@pytest.mark.parametrize("name", ["dpm_solver", "dpm_solver++"])
def test_multistep_2m_is_second_order(sched, gauss, name):
    oracle, x_T, exact = gauss
    err = {n: rms(build_solver(name, steps=n, order=2, skip="logSNR").sample(oracle.eps, x_T, sched), exact)
           for n in (50, 100)}
    assert math.log2(err[50] / err[100]) >= 1.8, err


@pytest.mark.parametrize("skip", ["logSNR", "time_uniform", "time_quadratic"])
def test_first_order_dpm_solver_euler_and_ddim_agree(sched, mixture, skip):
    oracle, x_T, _ = mixture
    ddim = build_solver("ddim_grid", steps=12, skip=skip).sample(oracle.eps, x_T, sched)
    for name, kwargs in [("dpm_solver", {}), ("dpm_solver++", {}), ("dpm_solver", dict(method="singlestep")),
                         ("euler", {})]:
        out = build_solver(name, steps=12, order=1, skip=skip, **kwargs) if name != "euler" else \
            build_solver("euler", steps=12, skip=skip)
        assert (out.sample(oracle.eps, x_T, sched) - ddim).abs().max().item() < 1e-12, (name, kwargs)


def _karras_sampler(sched, oracle, x_T, times, step):
    """Run a k-diffusion style sampler on x̃ = x/α with σ = σ_t/α_t, denoiser D(x̃, σ) = x̂0."""
    pts = [(t, sched.marginal_alpha(t).item(), sched.marginal_std(t).item()) for t in times]
    sigmas = [s / a for _, a, s in pts]

    def denoise(x_tilde, i):
        t, a, s = pts[i]
        x = a * x_tilde
        return (x - s * oracle.eps(x, torch.full((x.shape[0],), t, dtype=F64))) / a

    x_tilde = x_T / pts[0][1]
    state = {}
    for i in range(len(times) - 1):
        x_tilde = step(x_tilde, sigmas, i, denoise, state)
    return pts[-1][1] * x_tilde


def _dpmpp_2m_step(x, sigmas, i, denoise, state):
    """DPM++(2M), k-diffusion form: λ = −log σ, second order from the previous denoised value."""
    denoised = denoise(x, i)
    t, t_next = -math.log(sigmas[i]), -math.log(sigmas[i + 1])
    h = t_next - t
    if "old" in state:
        r = (t - (-math.log(sigmas[i - 1]))) / h
        denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * state["old"]
    else:
        denoised_d = denoised
    state["old"] = denoised
    return (sigmas[i + 1] / sigmas[i]) * x - math.expm1(-h) * denoised_d


def _dpmpp_2s_step(x, sigmas, i, denoise, state):
    """DPM++(2S) (ancestral sampler with η = 0), k-diffusion form: midpoint in λ."""
    # The intermediate point needs its own time: the test supplies it through state["midpoints"].
    t, t_next = -math.log(sigmas[i]), -math.log(sigmas[i + 1])
    h = t_next - t
    denoised = denoise(x, i)
    s_mid, denoise_mid = state["midpoints"][i]
    x_2 = (s_mid / sigmas[i]) * x - math.expm1(-0.5 * h) * denoised
    return (sigmas[i + 1] / sigmas[i]) * x - math.expm1(-h) * denoise_mid(x_2)


def _dpmpp_3m_step(x, sigmas, i, denoise, state):
    """DPM++(3M) SDE sampler with η = 0, k-diffusion form (its warm-up step is the Taylor variant)."""
    denoised = denoise(x, i)
    h = -math.log(sigmas[i + 1]) + math.log(sigmas[i])
    x = math.exp(-h) * x - math.expm1(-h) * denoised
    hist = state.setdefault("hist", [])  # (denoised, h) of previous steps, newest last
    phi_2 = math.expm1(-h) / h + 1
    if len(hist) >= 2:
        (d2_, _), (d1_, h_1) = hist[-2], hist[-1]
        h_2 = hist[-2][1]
        r0, r1 = h_1 / h, h_2 / h
        d1_0, d1_1 = (denoised - d1_) / r0, (d1_ - d2_) / r1
        d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
        d2 = (d1_0 - d1_1) / (r0 + r1)
        x = x + phi_2 * d1 - (phi_2 / h - 0.5) * d2
    elif len(hist) == 1:
        d1_, h_1 = hist[-1]
        x = x + phi_2 * (denoised - d1_) / (h_1 / h)
    hist.append((denoised, h))
    return x


@pytest.mark.parametrize("skip", ["logSNR", "time_uniform"])
def test_dpm_solver_pp_2m_equals_k_diffusion_form(sched, mixture, skip):
    oracle, x_T, _ = mixture
    solver = build_solver("dpm_solver++", steps=15, order=2, skip=skip, method="multistep")
    times = time_grid(sched, skip, sched.T, sched.eps, 15)
    expected = _karras_sampler(sched, oracle, x_T, torch.tensor(times, dtype=F64), _dpmpp_2m_step)
    assert (solver.sample(oracle.eps, x_T, sched) - expected).abs().max().item() < 1e-12


def test_dpm_solver_pp_3m_taylor_equals_k_diffusion_3m(sched, mixture):
    oracle, x_T, _ = mixture
    solver = build_solver("dpm_solver++", steps=12, order=3, skip="logSNR", solver_type="taylor")
    times = time_grid(sched, "logSNR", sched.T, sched.eps, 12)
    expected = _karras_sampler(sched, oracle, x_T, torch.tensor(times, dtype=F64), _dpmpp_3m_step)
    assert (solver.sample(oracle.eps, x_T, sched) - expected).abs().max().item() < 1e-12


def test_dpm_solver_pp_singlestep_2_equals_k_diffusion_2s(sched, mixture):
    oracle, x_T, _ = mixture
    steps = 12  # 'fast' order 2 with an even budget: 6 steps of order 2 on a 7-point λ-uniform grid
    times = time_grid(sched, "logSNR", sched.T, sched.eps, steps // 2)
    midpoints = []
    for s, t in zip(times[:-1], times[1:]):
        lam_mid = (sched.marginal_lambda(s) + sched.marginal_lambda(t)) / 2
        t_mid = sched.inverse_lambda(torch.tensor(lam_mid.item(), dtype=F64))
        a, sg = sched.marginal_alpha(t_mid).item(), sched.marginal_std(t_mid).item()

        def denoise_mid(x_tilde, t_mid=t_mid.item(), a=a, sg=sg):
            x = a * x_tilde
            return (x - sg * oracle.eps(x, torch.full((x.shape[0],), t_mid, dtype=F64))) / a
        midpoints.append((sg / a, denoise_mid))
    step = lambda x, sig, i, den, st: _dpmpp_2s_step(x, sig, i, den, {"midpoints": midpoints})  # noqa: E731
    expected = _karras_sampler(sched, oracle, x_T, torch.tensor(times, dtype=F64), step)
    solver = build_solver("dpm_solver++", steps=steps, order=2, skip="logSNR", method="singlestep")
    assert (solver.sample(oracle.eps, x_T, sched) - expected).abs().max().item() < 1e-12


def test_order_schedules_follow_the_reference():
    assert multistep_orders(5, 3) == [1, 2, 3, 2, 1]  # warm-up, then lower_order_final (steps < 10)
    assert multistep_orders(5, 3, lower_order_final=False) == [1, 2, 3, 3, 3]
    assert multistep_orders(12, 3) == [1, 2] + [3] * 10  # no lowering from 10 steps on
    assert multistep_orders(9, 2) == [1] + [2] * 7 + [1]
    assert singlestep_orders(20, 3) == [3] * 6 + [2]
    assert singlestep_orders(21, 3) == [3] * 6 + [2, 1]
    assert singlestep_orders(22, 3) == [3] * 7 + [1]
    assert singlestep_orders(21, 2) == [2] * 10 + [1]
    assert singlestep_orders(4, 1) == [1] * 4


def _recording(oracle, log):
    def eps_fn(x, t):
        assert t.shape == (x.shape[0],) and bool((t == t[0]).all())
        log.append(t[0].item())
        return oracle.eps(x, t)
    return eps_fn


def test_model_times_follow_the_reference_grids(sched, gauss):
    oracle, x_T, _ = gauss
    uniform = torch.linspace(1.0, 1e-3, 10, dtype=F64)  # 9 intervals
    for kwargs in [dict(order=3, method="multistep"), dict(order=3, method="singlestep"), dict(order=1, method="singlestep")]:
        log = []
        build_solver("dpm_solver", steps=9, skip="time_uniform", **kwargs).sample(_recording(oracle, log), x_T, sched)
        # singlestep time_uniform [3, 3, 2, 1]: outer points at grid indices 0, 3, 6, 8, 9 and inner
        # points uniform in t inside each step, so the model sees exactly the 9-interval grid
        assert_near(torch.tensor(log, dtype=F64), uniform[:-1], atol=1e-12)
    log = []
    build_solver("dpm_solver++", steps=9, order=3, skip="logSNR", method="singlestep").sample(
        _recording(oracle, log), x_T, sched)
    lam = sched.marginal_lambda(torch.tensor(log, dtype=F64))
    outer = torch.linspace(sched.marginal_lambda(1.0).item(), sched.marginal_lambda(1e-3).item(), 5, dtype=F64)
    h = outer[1] - outer[0]  # K = 4 steps uniform in λ, orders [3, 3, 2, 1], r = (1/3, 2/3) then 1/2
    expected = [outer[0], outer[0] + h / 3, outer[0] + 2 * h / 3, outer[1], outer[1] + h / 3, outer[1] + 2 * h / 3,
                outer[2], outer[2] + h / 2, outer[3]]
    assert_near(lam, torch.stack(expected), atol=1e-9)


@pytest.mark.parametrize("name,kwargs,nfe", [
    ("dpm_solver", dict(steps=20, order=3, method="singlestep"), 20),
    ("dpm_solver++", dict(steps=20, order=2, method="singlestep"), 20),
    ("dpm_solver++", dict(steps=21, order=2, method="singlestep"), 21),
    ("dpm_solver", dict(steps=20, order=3, method="singlestep_fixed"), 18),
    ("dpm_solver++", dict(steps=20, order=3, method="multistep"), 20),
    ("dpm_solver++", dict(steps=7, order=2, method="multistep"), 7),
    ("dpm_solver++", dict(steps=7, order=2, denoise_to_zero=True), 8),
    ("ddim_grid", dict(steps=13), 13), ("euler", dict(steps=13), 13), ("heun", dict(steps=13), 26),
    ("ddpm", dict(steps=13), 13), ("ddim", dict(steps=13), 13), ("ddim", dict(respacing="10,15,20"), 45),
    ("ddpm", dict(respacing="ddim25"), 25), ("ode", dict(method="rk4", steps=5), 20),
])
def test_nfe_counts(sched, gauss, name, kwargs, nfe):
    oracle, x_T, _ = gauss
    log = []
    solver = build_solver(name, **kwargs)
    solver.sample(_recording(oracle, log), x_T, sched, generator=torch.Generator().manual_seed(0))
    assert solver.nfe == len(log) == nfe


def test_adaptive_and_ode_nfe_is_the_number_of_calls(sched, gauss):
    oracle, x_T, _ = gauss
    for solver in (build_solver("dpm_solver", order=3, method="adaptive"), build_solver("ode", rtol=1e-4, atol=1e-4)):
        log = []
        solver.sample(_recording(oracle, log), x_T, sched)
        assert solver.nfe == len(log) > 10


def test_denoise_to_zero_returns_the_data_prediction(sched, gauss):
    oracle, x_T, _ = gauss
    x_end = build_solver("dpm_solver++", steps=10).sample(oracle.eps, x_T, sched)
    x0 = build_solver("dpm_solver++", steps=10, denoise_to_zero=True).sample(oracle.eps, x_T, sched)
    a, s = sched.marginal_alpha(1e-3).item(), sched.marginal_std(1e-3).item()
    t = torch.full((x_T.shape[0],), 1e-3, dtype=F64)
    assert_near(x0, (x_end - s * oracle.eps(x_end, t)) / a, atol=1e-13)


def _moment_error(out, mean, std):
    return ((out.mean(0) - mean).abs() + (out.std(0) - std).abs()).mean().item()


@pytest.mark.parametrize("name,kwargs", [("ddpm", {}), ("ddpm", dict(variance="fixed_large")), ("ddim", dict(eta=1.0)),
                                         ("ddim_grid", dict(eta=1.0))])
def test_stochastic_solvers_approach_the_data_distribution(sched, name, kwargs):
    oracle = GaussianOracle(sched, torch.tensor([0.5, -1.0], dtype=F64), torch.tensor([0.3, 1.5], dtype=F64))
    x_T = torch.randn(8000, 2, dtype=F64, generator=torch.Generator().manual_seed(3))
    # the chain samplers end with x̂0 at the first training step, ddim_grid with x at t_end
    mean, std = oracle.marginal(sched.eps) if name == "ddim_grid" else oracle.denoised_marginal(sched.eps)
    errors = [_moment_error(build_solver(name, steps=n, **kwargs).sample(
        oracle.eps, x_T, sched, generator=torch.Generator().manual_seed(4)), mean, std) for n in (5, 20, 100)]
    assert errors[0] > 1.5 * errors[1] > 2.25 * errors[2], errors


def test_respacing_follows_adm_space_timesteps():
    kept = space_timesteps(1000, "250")
    assert len(kept) == 250 and kept[0] == 0 and kept[-1] == 999
    assert kept[:4] == [0, 4, 8, 12] and set(b - a for a, b in zip(kept, kept[1:])) == {4, 5}
    assert space_timesteps(1000, 1000) == list(range(1000))
    # one section of 1000 keeping 25: stride 999/24 = 41.625 accumulated, Python rounding (166.5 -> 166)
    assert space_timesteps(1000, "25")[:6] == [0, 42, 83, 125, 166, 208] and space_timesteps(1000, "25")[-1] == 999
    assert space_timesteps(1000, "ddim25") == list(range(0, 1000, 40))
    assert space_timesteps(1000, "ddim7") == list(range(0, 1000, 143))  # the first stride giving 7 steps
    # sections of 334, 333, 333 (the first takes the remainder), strides 333/9, 332/14, 332/19
    sections = space_timesteps(1000, "10,15,20")
    assert len(sections) == 45 and sections[:10] == [37 * i for i in range(10)]
    assert sections[10:12] == [334, 334 + round(332 / 14)] and sections[24] == 334 + 332 and sections[25] == 667
    assert sections[-1] == 999
    for bad in ("ddim999", "abc", "ddim", "5,x", "0", "-3"):
        with pytest.raises(UserError, match="respacing"):
            space_timesteps(1000, bad)
    with pytest.raises(UserError, match="section of 5"):
        space_timesteps(10, "6,6")


@pytest.mark.parametrize("solver", ["ddpm", "ddim"])
@pytest.mark.parametrize("spec", [{"steps": 1}, {"respacing": "5" + ",0" * 9}])
def test_a_chain_that_starts_where_the_image_is_mostly_signal_is_refused(solver, spec):
    """ADM's respacing keeps step 0 alone for one step (and steps 0-99 only for "5,0,...,0" in ten sections):
    started from pure noise at ᾱ > 0.5, the chain handed the noise back as the sample, silently."""
    sched = build_schedule("linear")
    x_T = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    with pytest.raises(UserError, match=r"starts at training step \d+ of 1000, where ᾱ = 0\.\d+ is mostly signal"):
        build_solver(solver, **spec).sample(lambda x, t: torch.zeros_like(x), x_T, sched)
    two = build_solver(solver, steps=2).sample(lambda x, t: torch.zeros_like(x), x_T, sched)
    assert two.shape == x_T.shape  # steps 0 and 999: the chain starts from noise where noise belongs


def _adm_chain_loop(sched, eps_fn, x_T, kept, step, generator):
    """ADM's sampling loop on a respaced chain, written from its equations (float64)."""
    abar = sched.alphas_cumprod[kept].tolist()
    x = x_T
    for i in reversed(range(len(kept))):
        t = torch.full((x.shape[0],), (kept[i] + 1) / sched.num_steps, dtype=F64)
        out = eps_fn(x, t)
        abar_prev = abar[i - 1] if i > 0 else 1.0
        x = step(x, out, abar[i], abar_prev, i, lambda: torch.randn(x.shape, generator=generator, dtype=F64))
    return x


def _adm_ddim_step(eta, clip):
    def step(x, eps, abar, abar_prev, i, noise):
        x0 = (1 / abar) ** 0.5 * x - (1 / abar - 1) ** 0.5 * eps
        if clip:
            x0 = x0.clamp(-1, 1)
        eps = ((1 / abar) ** 0.5 * x - x0) / (1 / abar - 1) ** 0.5
        sigma = eta * ((1 - abar_prev) / (1 - abar)) ** 0.5 * (1 - abar / abar_prev) ** 0.5
        mean = x0 * abar_prev ** 0.5 + (1 - abar_prev - sigma**2) ** 0.5 * eps
        return mean + sigma * noise() if i > 0 else mean
    return step


@pytest.mark.parametrize("respacing,eta,clip", [("25", 0.0, False), ("ddim10", 0.5, True), ("3,4,5", 1.0, False)])
def test_ddim_is_adm_ddim_sample_loop(sched, gauss, respacing, eta, clip):
    oracle, x_T, _ = gauss
    kept = space_timesteps(sched.num_steps, respacing)
    expected = _adm_chain_loop(sched, oracle.eps, 2 * x_T, kept, _adm_ddim_step(eta, clip), torch.Generator().manual_seed(7))
    log = []
    solver = build_solver("ddim", respacing=respacing, eta=eta, clip_denoised=clip)
    out = solver.sample(_recording(oracle, log), 2 * x_T, sched, generator=torch.Generator().manual_seed(7))
    assert_near(out, expected, atol=1e-12)
    assert_near(torch.tensor(log, dtype=F64), (torch.tensor(kept[::-1], dtype=F64) + 1) / 1000, atol=0)
    if clip:
        assert out.abs().max() <= 1.0 and (2 * x_T).abs().max() > 1.0


def _adm_ddpm_step(x, out, abar, abar_prev, i, noise):
    """p_sample with learned-range variance (iDDPM eq. 15), clip_denoised=False."""
    eps, v = out
    beta = 1 - abar / abar_prev
    x0 = (1 / abar) ** 0.5 * x - (1 / abar - 1) ** 0.5 * eps
    mean = beta * abar_prev ** 0.5 / (1 - abar) * x0 + (1 - abar_prev) * (1 - beta) ** 0.5 / (1 - abar) * x
    if i == 0:
        return mean
    log_var = (v + 1) / 2 * math.log(beta) + (1 - v) / 2 * math.log(beta * (1 - abar_prev) / (1 - abar))
    return mean + torch.exp(0.5 * log_var) * noise()


def test_ddpm_is_adm_p_sample_loop_with_learned_range(sched, gauss):
    oracle, x_T, _ = gauss

    def eps_fn(x, t):  # a variance output that varies over samples, channels and time
        return oracle.eps(x, t), torch.tanh(x + 3 * t[:, None] - 1)
    expected = _adm_chain_loop(sched, eps_fn, x_T, space_timesteps(1000, "10,15,20"), _adm_ddpm_step,
                               torch.Generator().manual_seed(8))
    out = build_solver("ddpm", respacing="10,15,20", variance="learned").sample(
        eps_fn, x_T, sched, generator=torch.Generator().manual_seed(8))
    assert_near(out, expected, atol=1e-12)


@pytest.mark.parametrize("name", ["dpm_solver", "dpm_solver++"])
def test_ddim_eta0_equals_first_order_dpm_solver_with_denoise_to_zero(sched, mixture, name):
    """'ddim25' keeps 0, 40, ..., 960: a time-uniform grid from t = 961/N to 1/N, then x̂0 there."""
    oracle, x_T, _ = mixture
    ddim = build_solver("ddim", respacing="ddim25")
    out = ddim.sample(oracle.eps, x_T, sched)
    dpm = build_solver(name, steps=24, order=1, skip="time_uniform", t_start=0.961, t_end=0.001, denoise_to_zero=True)
    assert_near(dpm.sample(oracle.eps, x_T, sched), out, atol=1e-12)
    assert ddim.nfe == dpm.nfe == 25
    uneven = build_solver("ddim", steps=25).sample(oracle.eps, x_T, sched)  # "25": 0, 42, 83, ... (not uniform)
    assert (uneven - out).abs().max() > 1e-4


def test_chain_solvers_on_a_continuous_schedule_end_with_the_data_prediction(gauss):
    vp = build_schedule("vp_linear")
    oracle = GaussianOracle(vp, gauss[0].mean, gauss[0].std)
    x_T = gauss[1]
    times = time_grid(vp, "logSNR", 1.0, 1e-3, 9)
    ddim = build_solver("ddim", steps=10, skip="logSNR").sample(oracle.eps, x_T, vp)
    grid = build_solver("ddim_grid", steps=9, skip="logSNR").sample(oracle.eps, x_T, vp)
    a, s = vp.marginal_alpha(times[-1]).item(), vp.marginal_std(times[-1]).item()
    t = torch.full((x_T.shape[0],), times[-1], dtype=F64)
    assert_near(ddim, (grid - s * oracle.eps(grid, t)) / a, atol=1e-12)
    with pytest.raises(UserError, match="discrete"):
        build_solver("ddim", respacing="ddim5").sample(oracle.eps, x_T, vp)


def test_ddpm_learned_variance_interpolates_between_the_fixed_ones(sched, gauss):
    oracle, x_T, _ = gauss

    def run(variance, v_value=None, as_channels=False):
        def eps_fn(x, t):
            eps = oracle.eps(x, t)
            if v_value is None:
                return eps
            v = torch.full_like(eps, v_value)
            return torch.cat([eps, v], dim=1) if as_channels else (eps, v)
        return build_solver("ddpm", steps=10, variance=variance).sample(
            eps_fn, x_T, sched, generator=torch.Generator().manual_seed(5))

    small, large = run("fixed_small"), run("fixed_large")
    assert (small - large).abs().max().item() > 1e-3
    assert_near(run("learned", 1.0), large, atol=1e-12)
    assert_near(run("learned", -1.0, as_channels=True), small, atol=1e-12)
    halfway = run("learned", 0.0)
    assert (halfway - small).abs().max() > 1e-4 and (halfway - large).abs().max() > 1e-4
    with pytest.raises(UserError, match="learned"):
        run("learned")


def test_other_solvers_ignore_a_variance_output(sched, gauss):
    oracle, x_T, _ = gauss
    plain = build_solver("dpm_solver++", steps=8).sample(oracle.eps, x_T, sched)
    with_v = build_solver("dpm_solver++", steps=8).sample(
        lambda x, t: torch.cat([oracle.eps(x, t), torch.zeros_like(x)], dim=1), x_T, sched)
    assert torch.equal(plain, with_v)


def test_float32_sampling_keeps_dtype_and_feeds_float32_time(sched, gauss):
    oracle, x_T, exact = gauss
    seen = []

    def eps_fn(x, t):
        seen.append((x.dtype, t.dtype))
        return oracle.eps(x.double(), t.double()).float()
    out = build_solver("dpm_solver++", steps=20, order=2, skip="logSNR").sample(eps_fn, x_T.float(), sched)
    assert out.dtype == torch.float32 and set(seen) == {(torch.float32, torch.float32)}
    assert rms(out.double(), exact) < 0.02


@pytest.mark.parametrize("name", ["ddpm", "ddim"])
def test_chain_solvers_feed_the_kept_steps_exactly_whatever_the_dtype(gauss, name):
    """The chain walks training steps t = (n+1)/N: given in float32, 8 of DiT's 250 kept steps reached the model
    as 7.9999995 or 502.00003 where DiT feeds the integer step (its index map, 1000·(t − 1/N), on float32 t)."""
    oracle, x_T, _ = gauss
    linear = build_schedule("linear", num_steps=1000)
    seen = []

    def eps_fn(x, t):
        seen.append(t)
        return oracle.eps(x.double(), t.double()).to(x.dtype)

    build_solver(name, respacing="250").sample(eps_fn, x_T.float(), linear)
    steps = torch.cat([1000.0 * (t.double() - 1.0 / 1000) for t in seen])
    assert len(seen) == 250 and (steps - steps.round()).abs().max() < 1e-9
    assert set(steps.round().long().tolist()) == set(space_timesteps(1000, "250"))


@pytest.mark.parametrize("name", ["ddpm", "ddim"])
def test_a_float32_model_given_float64_time_keeps_the_chain_float32(name):
    """The chain's float64 t promoted a float32 model's ε̂ (α_t·net(x) in float64): the state turned float64
    after one step, and a float32 network then failed on it ('mat1 and mat2 must have the same dtype')."""
    sched = build_schedule("linear")
    net = torch.nn.Linear(4, 4)
    seen = []

    def eps_fn(x, t):
        seen.append(x.dtype)
        a, s = sched.marginal_alpha(t)[:, None], sched.marginal_std(t)[:, None]
        return (x - a * net(x)) / s

    out = build_solver(name, steps=10).sample(eps_fn, torch.randn(2, 4, generator=torch.Generator().manual_seed(0)),
                                              schedule=sched, generator=torch.Generator().manual_seed(1))
    assert out.dtype == torch.float32 and set(seen) == {torch.float32} and len(seen) == 10


@pytest.mark.parametrize("schedule,skip", [("vp_linear", "logSNR"), ("vp_linear", "karras"), ("linear", "karras"),
                                           ("cosine", "karras"), ("cosine", "time_uniform")])
def test_a_fixed_step_ode_samples_in_float64_on_every_grid(gauss, schedule, skip):
    """The grid's λ went through λ → t → λ and its ends missed those of the interval by an ulp: torchdiffeq
    asserted (a traceback) for every float64 rk4 run on U-ViT's schedule (vp_linear, logSNR grid)."""
    sched = build_schedule(schedule)
    oracle = GaussianOracle(sched, gauss[0].mean, gauss[0].std)
    x_T = gauss[1]
    exact = oracle.flow(x_T, sched.T, sched.eps)
    errors = []
    for steps in (1, 40, 80):
        out = build_solver("ode", method="rk4", steps=steps, skip=skip).sample(oracle.eps, x_T, sched)
        assert out.dtype == F64
        errors.append(rms(out, exact))
    assert errors[1] / errors[2] > 8  # rk4 is fourth order: 16x per doubling (measured 12-16.6; second order gives 4)


@pytest.mark.parametrize("name,kwargs,match", [
    ("dpm_solver", dict(method="multistpe"), "multistep"),
    ("dpm_solver++", dict(order=4), "order"),
    ("dpm_solver++", dict(order=1, method="adaptive"), "order"),
    ("dpm_solver++", dict(steps=2, order=3), "steps >= 3"),
    ("dpm_solver", dict(skip="log_snr"), "logSNR"),
    ("ddpm", dict(variance="learnt"), "learned"),
    ("ode", dict(method="rk4"), "steps"),
    ("ddim", dict(steps=0), "steps"),
    ("ddim", dict(steps=30, respacing="ddim25"), "disagrees"),
    ("ddpm", dict(respacing="ddimx"), "respacing"),
    ("ddim", dict(eta=-1), "eta"),
])
def test_bad_options_are_user_errors(name, kwargs, match):
    with pytest.raises(UserError, match=match):
        build_solver(name, **kwargs)


def test_registry_builds_each_solver():
    assert type(build_solver("dpm_solver")) is DPMSolver
    assert type(build_solver("dpm_solver++")) is DPMSolverPlusPlus
    for name in ("ddpm", "ddim", "ddim_grid", "euler", "heun", "ode"):
        assert callable(build_solver(name).sample)


@pytest.mark.parametrize("name", ["dpm_solver++", "euler", "ddim_grid", "heun"])
def test_times_outside_the_schedule_are_one_line(name):
    """Below ~1e-4 the discrete linear schedule's interpolated log α turns positive and σ = √(1 − α²) raised
    a math domain error; past the cosine schedule's T (0.9946) samples blew up to ~1e15 without an error."""
    x = torch.randn(2, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    with pytest.raises(UserError, match=r"t_end 0.0001 is below the first noise level .*use t_end >= 0.001"):
        build_solver(name, steps=4, t_end=1e-4).sample(lambda x, t: 0.1 * x, x, build_schedule("linear"))
    with pytest.raises(UserError, match=r"t_start 1.0 is past the end of CosineSchedule.*T = 0.9946"):
        build_solver(name, steps=4, t_start=1.0).sample(lambda x, t: 0.1 * x, x, build_schedule("cosine"))
    out = build_solver(name, steps=4, t_end=1e-4).sample(lambda x, t: 0.1 * x, x, build_schedule("vp_linear"))
    assert torch.isfinite(out).all()  # a continuous schedule has noise below its eps: allowed


def test_steps_given_to_an_adaptive_ode_method_are_refused():
    """--solver ode --steps 3 and --steps 50 drew the same pixels: dopri5 ignores steps."""
    with pytest.raises(UserError, match="ode method 'dopri5' is adaptive: rtol and atol set its steps, not steps=3"):
        build_solver("ode", steps=3)
    assert build_solver("ode", method="rk4", steps=3).steps == 3


def test_steps_given_to_adaptive_dpm_solver_are_refused():
    """method adaptive sets its steps from atol/rtol: steps=3 and steps=50 drew the same samples."""
    for name in ("dpm_solver", "dpm_solver++"):
        with pytest.raises(UserError, match="adaptive DPM-Solver: atol and rtol set its steps, not steps=3"):
            build_solver(name, order=3, method="adaptive", steps=3)
    assert build_solver("dpm_solver", order=2).steps == 20  # the default when steps is not given


@pytest.mark.parametrize("name", ["ddpm", "ddim"])
def test_skip_on_a_discrete_chain_is_refused_not_ignored(name, sched):
    """On a discrete schedule ddpm/ddim walk the respaced chain: skip='logSNR' drew time_uniform's samples."""
    x = torch.randn(2, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    with pytest.raises(UserError, match=f"{name.upper()}Solver on a discrete schedule .* skip='logSNR' would be ignored"):
        build_solver(name, steps=4, skip="logSNR").sample(lambda x, t: 0.1 * x, x, sched)
    assert torch.isfinite(build_solver(name, steps=4).sample(lambda x, t: 0.1 * x, x, sched)).all()
    continuous = build_schedule("vp_linear")  # there skip picks the grid, and two skips give two chains
    uniform = build_solver(name, steps=4).chain(continuous)[0]
    log_snr = build_solver(name, steps=4, skip="logSNR").chain(continuous)[0]
    assert uniform != log_snr


def test_sample_with_a_schedule_name_instead_of_a_schedule_says_how_to_build_one():
    """schedule="linear" was AttributeError: 'str' object has no attribute 'discrete'."""
    x = torch.zeros(2, 3, dtype=F64)
    with pytest.raises(UserError, match=r"a solver samples on a NoiseSchedule, got str 'linear'.*build_schedule"):
        build_solver("ddim", steps=3).sample(lambda x, t: x, x, schedule="linear")
    with pytest.raises(UserError, match="eps_fn must be callable"):
        build_solver("euler", steps=3).sample(None, x, build_schedule("linear"))


def test_the_python_builders_check_options_as_recipes_do():
    """build_schedule("linear", beta_end=1.5) sampled NaN; build_solver("ddim", eta=nan) dropped the noise."""
    for build in (lambda: build_schedule("linear", beta_end=1.5), lambda: build_schedule("linear", num_steps=0),
                  lambda: build_solver("ddim", eta=float("nan")), lambda: build_solver("ode", rtol=-1.0),
                  lambda: build_solver("ddim", bogus=1)):
        with pytest.raises(UserError):
            build()


@pytest.mark.parametrize("name", ["dpm_solver++", "ddpm", "euler"])
def test_an_eps_fn_returning_per_branch_predictions_is_named_not_broadcast(name):
    """A DiMR passed as eps_fn returns [low-res, full-res]: its low-resolution prediction was taken as
    ε̂ and its full-resolution one as v, and the step failed with "The size of tensor a (8) must match
    the size of tensor b (4)"."""
    sched = build_schedule("linear")
    x = torch.randn(2, 3, 8, 8)
    branches = lambda x, t: [torch.zeros(2, 3, 4, 4), torch.zeros_like(x)]  # noqa: E731
    with pytest.raises(UserError, match=r"eps_fn returned a list of 2 \(\(2, 3, 4, 4\), \(2, 3, 8, 8\)\).*out\[-1\]"):
        build_solver(name, steps=2).sample(branches, x, schedule=sched)
    with pytest.raises(UserError, match=r"eps_fn returned shape \(2, 3, 4, 4\); it must return ε̂ shaped like x"):
        build_solver(name, steps=2).sample(lambda x, t: torch.zeros(2, 3, 4, 4), x, schedule=sched)
    out = build_solver(name, steps=2).sample(lambda x, t: branches(x, t)[-1], x, schedule=sched)
    assert out.shape == x.shape


@pytest.mark.parametrize("solver", ["ddim", "ddim_grid"])
def test_ddim_eta_above_one_is_refused_not_clamped(solver):
    """Past 1 the noise exceeds what the step leaves: ADM's formula takes a negative square root (NaN);
    zoo clamped it to 0 silently and sampled something else (|x| of 4e4 at eta 100)."""
    import zoo
    from zoo.errors import UserError

    assert zoo.build_component("solver", {"type": solver, "eta": 1.0}).eta == 1.0
    with pytest.raises(UserError, match=r"eta must be a number in \[0, 1\], got 1.5"):
        zoo.build_component("solver", {"type": solver, "eta": 1.5})


@pytest.mark.parametrize("spec, message", [
    ({"type": "dpm_solver++", "atol": 0.5}, "atol is unused here: the tolerances set the steps of method adaptive only"),
    ({"type": "dpm_solver", "method": "singlestep", "rtol": 0.5}, "rtol is unused here"),
    ({"type": "dpm_solver++", "method": "singlestep", "lower_order_final": False},
     "lower_order_final is unused here: it shapes only method multistep's last steps, not singlestep's"),
    ({"type": "ode", "method": "rk4", "steps": 3, "rtol": 1e-3}, "rtol is unused here: ode method 'rk4' steps on a fixed"),
    ({"type": "euler", "skip": "logSNR", "rho": 3.0}, "rho is unused here: it shapes only skip karras's grid"),
    ({"type": "heun", "skip": "time_uniform", "rho": 3.0}, "rho is unused here"),
])
def test_an_option_the_solver_would_ignore_is_refused(spec, message):
    """Each was accepted and changed nothing (the samples bit-identical with and without it)."""
    import zoo

    with pytest.raises(UserError, match=re.escape(message)):
        zoo.build_component("solver", spec)


def test_the_same_options_where_they_act_are_taken_with_the_old_defaults():
    import zoo

    # lower_order_final's default, true, spelled out for singlestep as DPM-Solver's sample() takes it
    assert zoo.build_component("solver", {"type": "dpm_solver++", "method": "singlestep", "lower_order_final": True})

    adaptive = zoo.build_component("solver", {"type": "dpm_solver++", "method": "adaptive", "atol": 0.01})
    assert (adaptive.atol, adaptive.rtol) == (0.01, 0.05)
    multistep = zoo.build_component("solver", {"type": "dpm_solver++"})
    assert multistep.lower_order_final is True and (multistep.atol, multistep.rtol) == (0.0078, 0.05)
    assert zoo.build_component("solver", {"type": "euler", "rho": 3.0}).rho == 3.0
    assert zoo.build_component("solver", {"type": "euler"}).rho == 7.0
    assert (zoo.build_component("solver", "ode").rtol, zoo.build_component("solver", "ode").atol) == (1e-5, 1e-5)


@pytest.mark.parametrize("name, options", [
    ("dpm_solver", dict(method="singlestep", order=3, steps=20)),
    ("dpm_solver", dict(method="singlestep", order=3, steps=50)),
    ("dpm_solver++", dict(method="adaptive", order=2)),
    ("dpm_solver", dict(method="adaptive", order=2)),
])  # fmt: skip
def test_dpm_solver_on_the_cosine_table_follows_the_flow_from_where_it_starts(name, options):
    """From t = 1 (λ = −9.9) singlestep order 3 of the noise form returned values of 200-7000 and adaptive
    order 2 of the data form took 2 steps of a wrong sample: started at λ ≈ −5.1, as the reference does,
    each follows the exact flow of Gaussian data (std 0.5) from there."""
    from zoo.solvers.oracles import GaussianOracle

    sched = build_schedule("cosine_discrete")
    oracle = GaussianOracle(sched, torch.zeros(48, dtype=torch.float64), torch.full((48,), 0.5, dtype=torch.float64))
    x = torch.randn(256, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    solver = build_solver(name, **options)
    assert solver.time_range(sched) == (0.996, 0.001)
    out = solver.sample(oracle.eps, x, schedule=sched)
    exact = oracle.flow(x, 0.996, 0.001)
    # measured 0.016-0.14 (the solvers' own error at these steps); from t = 1 it was 24 to 1e4
    assert (out - exact).abs().max() < 0.2 and solver.nfe >= 20
    start = build_solver(name, **options, t_start=1.0)  # an explicit t_start is kept
    assert start.time_range(sched) == (1.0, 0.001)
