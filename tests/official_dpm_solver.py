"""Reference DPM-Solver loops of the U-ViT and DiMR releases, written from their equations (float64).

Used by tests/test_official_samplers.py as the official side; nothing here imports zoo's solvers.
Schedules follow the releases' ``NoiseScheduleVP``: 'linear' (VP-SDE, β0 = 0.1, β1 = 20) and
'discrete' (½·log ᾱ_n at t_n = (n + 1)/N, piecewise linear).
"""

from __future__ import annotations

import math

import torch


class VPLinear:
    """NoiseScheduleVP('linear'): log α = −(β1 − β0)t²/4 − β0·t/2, β0 = 0.1, β1 = 20."""

    b0, b1 = 0.1, 20.0

    def log_alpha(self, t):
        return -0.25 * t**2 * (self.b1 - self.b0) - 0.5 * t * self.b0

    def inverse_lambda(self, lam):
        tmp = 2 * (self.b1 - self.b0) * math.log1p(math.exp(-2 * lam))
        return tmp / (math.sqrt(self.b0**2 + tmp) + self.b0) / (self.b1 - self.b0)


class Discrete:
    """NoiseScheduleVP('discrete', betas): ½·log ᾱ_n at t_n = (n + 1)/N, linear in between."""

    def __init__(self, betas):
        self.n = len(betas)
        self.knots = [(i + 1) / self.n for i in range(self.n)]
        self.values = (0.5 * torch.cumsum(torch.log(1 - betas), 0)).tolist()

    @staticmethod
    def _interp(x, xs, ys):
        i = min(max(sum(1 for v in xs if v < x), 1), len(xs) - 1)  # the segment [xs[i-1], xs[i]]
        return ys[i - 1] + (x - xs[i - 1]) * (ys[i] - ys[i - 1]) / (xs[i] - xs[i - 1])

    def log_alpha(self, t):
        return self._interp(t, self.knots, self.values)

    def inverse_lambda(self, lam):
        log_alpha = -0.5 * math.log1p(math.exp(-2 * lam))
        return self._interp(log_alpha, self.values[::-1], self.knots[::-1])


def coeffs(ns, t):
    """α_t, σ_t and λ_t of schedule ``ns`` at time t (Python floats)."""
    log_alpha = ns.log_alpha(t)
    sigma = math.sqrt(1 - math.exp(2 * log_alpha))
    return math.exp(log_alpha), sigma, log_alpha - math.log(sigma)


def _fast_orders(steps):
    k = steps // 3 + 1
    return [3] * (k - 2) + [2, 1] if steps % 3 == 0 else [3] * (k - 1) + ([1] if steps % 3 == 1 else [2])


def _noise_form_step(model, ns, x, s, t, order, r1, r2):
    """DPM-Solver-1/2/3 (Lu et al. 2022, Algorithms 1-2, 'dpm_solver' differences) on ε̂."""
    (a_s, _, l_s), (a_t, s_t, l_t) = coeffs(ns, s), coeffs(ns, t)
    h = l_t - l_s
    e_s = model(x, s)
    x_t = a_t / a_s * x - s_t * math.expm1(h) * e_s
    if order == 1:
        return x_t
    s1 = ns.inverse_lambda(l_s + r1 * h)
    a_1, s_1, _ = coeffs(ns, s1)
    e_1 = model(a_1 / a_s * x - s_1 * math.expm1(r1 * h) * e_s, s1)
    if order == 2:
        return x_t - (0.5 / r1) * s_t * math.expm1(h) * (e_1 - e_s)
    s2 = ns.inverse_lambda(l_s + r2 * h)
    a_2, s_2, _ = coeffs(ns, s2)
    x_2 = (a_2 / a_s * x - s_2 * math.expm1(r2 * h) * e_s
           - (r2 / r1) * s_2 * (math.expm1(r2 * h) / (r2 * h) - 1) * (e_1 - e_s))
    e_2 = model(x_2, s2)
    return x_t - (1 / r2) * s_t * (math.expm1(h) / h - 1) * (e_2 - e_s)


def _data_form_step(model, ns, x, s, t, order, r1, r2):
    """DPM-Solver++ 1/2/3 (Lu et al. 2022b, singlestep, 'dpm_solver' differences) on x̂0 = (x − σ·ε̂)/α."""
    def x0(x, u):
        alpha, sigma, _ = coeffs(ns, u)
        return (x - sigma * model(x, u)) / alpha

    (_, s_s, l_s), (a_t, s_t, l_t) = coeffs(ns, s), coeffs(ns, t)
    h = l_t - l_s
    d_s = x0(x, s)
    x_t = s_t / s_s * x - a_t * math.expm1(-h) * d_s
    if order == 1:
        return x_t
    s1 = ns.inverse_lambda(l_s + r1 * h)
    a_1, s_1, _ = coeffs(ns, s1)
    d_1 = x0(s_1 / s_s * x - a_1 * math.expm1(-r1 * h) * d_s, s1)
    if order == 2:
        return x_t - (0.5 / r1) * a_t * math.expm1(-h) * (d_1 - d_s)
    s2 = ns.inverse_lambda(l_s + r2 * h)
    a_2, s_2, _ = coeffs(ns, s2)
    x_2 = (s_2 / s_s * x - a_2 * math.expm1(-r2 * h) * d_s
           + (r2 / r1) * a_2 * (math.expm1(-r2 * h) / (r2 * h) + 1) * (d_1 - d_s))
    d_2 = x0(x_2, s2)
    return x_t + (1 / r2) * a_t * (math.expm1(-h) / h + 1) * (d_2 - d_s)


def dpm_solver_2022_fast(eps_fn, ns, x, steps, t_end):
    """U-ViT's dpm_solver_pytorch.py ``sample(fast_version=True)``: K = steps//3 + 1 steps uniform in λ
    from t = 1 to t_end, orders 3, ..., 3 then 2/1, noise form with r = (1/3, 2/3) and 1/2."""
    orders = _fast_orders(steps)
    lam0, lam1 = coeffs(ns, 1.0)[2], coeffs(ns, t_end)[2]
    grid = [ns.inverse_lambda(lam0 + (lam1 - lam0) * i / len(orders)) for i in range(len(orders) + 1)]
    for s, t, order in zip(grid[:-1], grid[1:], orders):
        x = _noise_form_step(eps_fn, ns, x, s, t, order, *((0.5, None) if order == 2 else (1 / 3, 2 / 3)))
    return x


def dpm_solver_pp_fast(eps_fn, ns, x, steps, t_end):
    """U-ViT's/DiMR's DPM-Solver++ copy, ``sample(method='fast', skip_type='time_uniform', order=3)``:
    a ``steps``-interval uniform grid; each step spans ``order`` intervals and takes r from their λ."""
    grid = [1.0 + (t_end - 1.0) * i / steps for i in range(steps + 1)]
    i = 0
    for order in _fast_orders(steps):
        lam = [coeffs(ns, grid[i + j])[2] for j in range(order + 1)]
        h = lam[-1] - lam[0]
        r = [(lam[j] - lam[0]) / h for j in range(1, order)] + [None, None]
        x = _data_form_step(eps_fn, ns, x, grid[i], grid[i + order], order, r[0], r[1])
        i += order
    return x


SD_BETAS = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2  # U-ViT-H, DiMR
