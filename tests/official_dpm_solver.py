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


# ------------------------------------------------------------------------------------------------
# Exponential integrators with Taylor terms, multistep order 3 and the adaptive step size algorithm,
# written from the equations (Lu et al. 2022, "DPM-Solver", eq. 3.4 and Algorithms 1-2, appendix
# "adaptive step size"; Lu et al. 2022b, "DPM-Solver++", eq. 8 and Algorithm 2). Used by
# tests/test_solver_pins.py. ``model(x, u)`` is the noise prediction ε̂ at time u (a float).
#
# With m = ε̂ (noise form) or m = x̂0 = (x − σ·ε̂)/α (data form) expanded in λ around s,
# m(λ_s + u) = Σ_k u^k/k!·m^(k), and D_k = h^k·m^(k) (h = λ_t − λ_s), the exact integrals are
#
#   noise: x_t = (α_t/α_s)·x_s − σ_t·Σ_k c_k·D_k,  c_k = h^−k ∫_0^h e^(h−u)·u^k/k! du = (e^h − Σ_{j≤k} h^j/j!)/h^k
#   data:  x_t = (σ_t/σ_s)·x_s + α_t·Σ_k c_k·D_k,  c_k = h^−k ∫_0^h e^(u−h)·u^k/k! du
#                                                       = (−1)^(k+1)·(e^−h − Σ_{j≤k} (−h)^j/j!)/h^k
#
# (α_t·e^−λ_s = σ_t·e^h and σ_t·e^λ_s = α_t·e^−h). The solvers differ only in how they estimate D_1, D_2.

def taylor_coefficient(form, k, h):
    """c_k of the noise form (e^h − 1 − h − ... − h^k/k!)/h^k or the data form (see above); e^±h − 1 via expm1."""
    z = h if form == "noise" else -h
    rest = math.expm1(z) - sum(z**j / math.factorial(j) for j in range(1, k + 1))  # e^z − Σ_{j≤k} z^j/j!
    return (rest if form == "noise" else (-1) ** (k + 1) * rest) / h**k


def model_value(model, ns, form, x, u):
    """ε̂ (noise form) or x̂0 = (x − σ_u·ε̂)/α_u (data form) at time u."""
    eps = model(x, u)
    if form == "noise":
        return eps
    alpha, sigma, _ = coeffs(ns, u)
    return (x - sigma * eps) / alpha


def advance(ns, form, x, s, t, terms):
    """x_t from x_s with the terms [(c_0, D_0), (c_1, D_1), ...] of the expansion (c_k as above, or an estimate)."""
    (a_s, s_s, _), (a_t, s_t, _) = coeffs(ns, s), coeffs(ns, t)
    total = sum(c * d for c, d in terms)
    return a_t / a_s * x - s_t * total if form == "noise" else s_t / s_s * x + a_t * total


def _h(ns, s, t):
    return coeffs(ns, t)[2] - coeffs(ns, s)[2]


def exact_terms(form, h, ds):
    """[(c_k, D_k)] with the exact coefficients for the derivatives ds = [D_0, D_1, ...]."""
    return [(taylor_coefficient(form, k, h), d) for k, d in enumerate(ds)]


def fit_derivatives(us, ms):
    """D_1, D_2 (in units of h) of the quadratic through (0, ms[0]), (us[1], ms[1]), (us[2], ms[2]):
    ms[i] − ms[0] = us[i]·D_1 + us[i]²/2·D_2, solved by Cramer's rule."""
    (u1, u2), (f1, f2) = us[1:], (ms[1] - ms[0], ms[2] - ms[0])
    det = u1 * u2**2 / 2 - u2 * u1**2 / 2
    return (f1 * u2**2 / 2 - f2 * u1**2 / 2) / det, (u1 * f2 - u2 * f1) / det


def singlestep_values(model, ns, form, x, s, t, order, r1, r2=None, m_s=None):
    """The model values of one singlestep step: at s, at λ_s + r1·h and (order 3) at λ_s + r2·h.
    The intermediate points are DPM-Solver-1 (to s1) and DPM-Solver-2 with exact coefficients (to s2:
    its D_1 over r2·h is (r2/r1)·(m_s1 − m_s)), as in Algorithm 2 of either paper."""
    h, lam_s = _h(ns, s, t), coeffs(ns, s)[2]
    m_s = model_value(model, ns, form, x, s) if m_s is None else m_s
    s1 = ns.inverse_lambda(lam_s + r1 * h)
    m_1 = model_value(model, ns, form, advance(ns, form, x, s, s1, exact_terms(form, r1 * h, [m_s])), s1)
    if order == 2:
        return [m_s, m_1]
    s2 = ns.inverse_lambda(lam_s + r2 * h)
    x_2 = advance(ns, form, x, s, s2, exact_terms(form, r2 * h, [m_s, (r2 / r1) * (m_1 - m_s)]))
    return [m_s, m_1, model_value(model, ns, form, x_2, s2)]


def singlestep_combine(ns, form, x, s, t, values, r1=None, r2=None, solver_type="dpmsolver"):
    """x_t of singlestep order len(values) from its model values.

    order 2, 'dpmsolver': D_1 = (m_1 − m_s)/r1 with c_1 replaced by c_0/2 (Algorithm 1);
    order 2, 'taylor':    the same D_1 with the exact c_1;
    order 3, 'dpmsolver': D_1 = (m_2 − m_s)/r2 with the exact c_1, no D_2 term (Algorithm 2);
    order 3, 'taylor':    D_1, D_2 of the quadratic through the three values, exact c_1, c_2.
    """
    h = _h(ns, s, t)
    c0 = taylor_coefficient(form, 0, h)
    if len(values) == 1:
        return advance(ns, form, x, s, t, [(c0, values[0])])
    if len(values) == 2:
        m_s, m_1 = values
        d1 = (m_1 - m_s) / r1
        c1 = c0 / 2 if solver_type == "dpmsolver" else taylor_coefficient(form, 1, h)
        return advance(ns, form, x, s, t, [(c0, m_s), (c1, d1)])
    m_s, _, m_2 = values
    if solver_type == "dpmsolver":
        return advance(ns, form, x, s, t, exact_terms(form, h, [m_s, (m_2 - m_s) / r2]))
    return advance(ns, form, x, s, t, exact_terms(form, h, [m_s, *fit_derivatives([0.0, r1, r2], values)]))


def fast_orders(steps, order):
    """DPM-Solver-fast's orders (Lu et al. 2022, section 'Choice of the order'): they sum to ``steps``."""
    if order == 3:
        return _fast_orders(steps)
    return [2] * (steps // 2) + [1] * (steps % 2) if order == 2 else [1] * steps


def singlestep_time_uniform(eps_fn, ns, form, x, steps, order, t_end, solver_type):
    """``sample(method='singlestep', skip_type='time_uniform')``: a ``steps``-interval uniform grid in t;
    each step spans ``order`` intervals and takes its r from their λ."""
    grid = [1.0 + (t_end - 1.0) * i / steps for i in range(steps + 1)]
    i = 0
    for k in fast_orders(steps, order):
        lam = [coeffs(ns, grid[i + j])[2] for j in range(k + 1)]
        r = [(lam[j] - lam[0]) / (lam[-1] - lam[0]) for j in range(1, k)] + [None, None]
        s, t = grid[i], grid[i + k]
        values = singlestep_values(eps_fn, ns, form, x, s, t, k, r[0], r[1]) if k > 1 else \
            [model_value(eps_fn, ns, form, x, s)]
        x = singlestep_combine(ns, form, x, s, t, values, r[0], r[1], solver_type)
        i += k
    return x


def multistep_time_uniform(eps_fn, ns, form, x, steps, order, t_end, solver_type="dpmsolver",
                           lower_order_final=True):
    """Multistep DPM-Solver(++) of ``order`` on a ``steps``-interval grid uniform in t.

    The step from p_0 to t uses the model values at the last points p_0, p_−1, p_−2 at
    u_i = (λ_{p_−i} − λ_{p_0})/h in units of h = λ_t − λ_{p_0}: order 2 takes D_1 = (m_0 − m_−1)/(−u_1)
    (coefficient c_0/2 for 'dpmsolver', c_1 for 'taylor'), order 3 D_1 and D_2 of the quadratic through the
    three values. The third-order step then weighs D_2/2, not D_2, against c_2: that is how the reference
    implementation (and k-diffusion's DPM++ 3M) define it, and zoo follows it rule for rule; with the full
    D_2 the local error would be O(h^4) instead of O(h^3). Warm-up with orders 1, 2, ...; with
    ``lower_order_final`` and fewer than 10 steps the last steps drop to ..., 2, 1.
    """
    grid = [1.0 + (t_end - 1.0) * i / steps for i in range(steps + 1)]
    points, values = [grid[0]], [model_value(eps_fn, ns, form, x, grid[0])]
    for step in range(1, steps + 1):
        k = min(order, step)
        if lower_order_final and steps < 10:
            k = min(k, steps + 1 - step)
        p0, t = points[-1], grid[step]
        h = _h(ns, p0, t)
        us = [_h(ns, p0, p) / h for p in points[::-1]]  # 0, u_1, u_2 (negative)
        ms = values[::-1]
        if k == 1:
            x = advance(ns, form, x, p0, t, exact_terms(form, h, ms[:1]))
        elif k == 2:
            d1 = (ms[0] - ms[1]) / (-us[1])
            c0 = taylor_coefficient(form, 0, h)
            c1 = c0 / 2 if solver_type == "dpmsolver" else taylor_coefficient(form, 1, h)
            x = advance(ns, form, x, p0, t, [(c0, ms[0]), (c1, d1)])
        else:
            d1, d2 = fit_derivatives(us[:3], ms[:3])
            x = advance(ns, form, x, p0, t, exact_terms(form, h, [ms[0], d1, d2 / 2]))
        points, values = (points + [t])[-order:], (values + [model_value(eps_fn, ns, form, x, t)])[-order:]
    return x


def adaptive(eps_fn, ns, form, x, order, t_end, rtol=0.05, atol=0.0078, solver_type="dpmsolver"):
    """DPM-Solver-12 (order 2) / -23 (order 3) with adaptive step size (Lu et al. 2022, appendix, algorithm
    'adaptive step size'), from t = 1 to ``t_end``; returns (x, number of model calls).

    Each trial step of size h in λ computes x_lower (order − 1: DPM-Solver-1, or DPM-Solver-2 at r1 = 1/3)
    and x_higher (DPM-Solver-2 at r1 = 1/2, or DPM-Solver-3 at r1, r2 = 1/3, 2/3) from shared model values,
    E = the largest over the batch of the RMS over a sample of (x_higher − x_lower)/δ with
    δ = max(atol, rtol·max(|x_lower|, |x_prev|)); x_prev is the lower-order solution of the last accepted
    step (x_T at first). E ≤ 1 accepts (x ← x_higher, x_prev ← x_lower, s ← t); then
    h ← min(θ·h·E^(−1/order), λ_end − λ_s) with θ = 0.9, h_init = 0.05; stop when |s − t_end| ≤ 1e-5.
    """
    calls = [0]

    def counted(x, u):
        calls[0] += 1
        return eps_fn(x, u)

    s, h, theta, x_prev = 1.0, 0.05, 0.9, x
    lam_end = coeffs(ns, t_end)[2]
    while abs(s - t_end) > 1e-5:
        t = ns.inverse_lambda(coeffs(ns, s)[2] + h)
        if order == 2:
            values = singlestep_values(counted, ns, form, x, s, t, 2, 0.5)
            x_lower = singlestep_combine(ns, form, x, s, t, values[:1])
            x_higher = singlestep_combine(ns, form, x, s, t, values, 0.5, None, solver_type)
        else:
            values = singlestep_values(counted, ns, form, x, s, t, 3, 1 / 3, 2 / 3)
            x_lower = singlestep_combine(ns, form, x, s, t, values[:2], 1 / 3, None, solver_type)
            x_higher = singlestep_combine(ns, form, x, s, t, values, 1 / 3, 2 / 3, solver_type)
        delta = torch.maximum(rtol * torch.maximum(x_lower.abs(), x_prev.abs()), torch.tensor(atol, dtype=x.dtype))
        err = max(((x_higher[i] - x_lower[i]) / delta[i]).pow(2).mean().sqrt().item() for i in range(x.shape[0]))
        if err <= 1.0:
            x, x_prev, s = x_higher, x_lower, t
        h = min(theta * h * err ** (-1.0 / order), lam_end - coeffs(ns, s)[2])
    return x, calls[0]


def ddim(eps_fn, x, times, abars, abar_last, eta, noise):
    """DDIM (Song et al. 2021, eq. 12) from the noisiest level abars[0] down the chain, the last step to
    ᾱ = ``abar_last``: x' = √ᾱ'·x̂0 + √(1 − ᾱ' − c²)·ε̂ + c·z, c = η·√((1 − ᾱ')/(1 − ᾱ))·√(1 − ᾱ/ᾱ'),
    ``noise()`` drawn whenever c ≠ 0."""
    for i, (u, abar) in enumerate(zip(times, abars)):
        abar_next = abars[i + 1] if i + 1 < len(abars) else abar_last
        eps = eps_fn(x, u)
        x0 = (x - math.sqrt(1 - abar) * eps) / math.sqrt(abar)
        c = eta * math.sqrt((1 - abar_next) / (1 - abar) * (1 - abar / abar_next))
        x = math.sqrt(abar_next) * x0 + math.sqrt(1 - abar_next - c * c) * eps + (c * noise() if c != 0 else 0)
    return x
