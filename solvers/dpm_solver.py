"""DPM-Solver (noise prediction) and DPM-Solver++ (data prediction): the update rules.

Both are exponential integrators of the probability-flow ODE in λ (half log-SNR), from s to t
with h = λ_t − λ_s:

    noise form (Lu et al. 2022, "DPM-Solver", eq. 3.4):    x_t = (α_t/α_s)·x_s − α_t ∫ e^{−λ} ε̂_λ dλ
    data form  (Lu et al. 2022, "DPM-Solver++", eq. 8):     x_t = (σ_t/σ_s)·x_s + σ_t ∫ e^{λ} x̂0_λ dλ

and expand ε̂ (or x̂0) in λ around s: order 1 is DDIM; singlestep order 2/3 add intermediate
points at λ_s + r1·h (and λ_s + r2·h), Algorithms 1–2 of each paper; multistep order 2/3 reuse the
model values of earlier steps (DPM-Solver++ Algorithm 2, and its order-3 extension).
``solver_type="dpmsolver"`` uses the papers' first-difference estimates, ``"taylor"`` the
Taylor-coefficient variant of the reference implementation. Loops and options:
:mod:`zoo.solvers.dpm_solver_loop`.

Multistep order 3 is the released update (DPM-Solver's reference code, k-diffusion's DPM++ 3M):
its ``d2 = (d1_0 − d1_1)/(r0 + r1)`` is half the second divided difference times h², weighted by the
coefficient of the whole second derivative, so its global error falls as h², not h³ (measured on
Gaussian data: /4 per halving of the step, /16 with the factor restored). It is kept as released:
zoo's samples are the official samplers' (tests/test_official_samplers.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from math import exp, expm1

from torch import Tensor

from .base import Point, ScheduledModel
from .dpm_solver_loop import DPMSolverBase


class DPMSolver(DPMSolverBase):
    """DPM-Solver (Lu et al. 2022): exponential integrator on the noise prediction ε̂."""

    def model_output(self, model: ScheduledModel, x: Tensor, p: Point) -> Tensor:
        return model.eps(x, p)

    def first_update(self, x: Tensor, s: Point, t: Point, m_s: Tensor) -> Tensor:
        """DPM-Solver-1 (= DDIM): x_t = (α_t/α_s)·x − σ_t·(e^h − 1)·ε̂_s."""
        h = t.lam - s.lam
        return exp(t.log_alpha - s.log_alpha) * x - t.sigma * expm1(h) * m_s

    def second_update(self, model: ScheduledModel, x: Tensor, s: Point, t: Point, r1: float,
                      m_s: Tensor) -> tuple[Tensor, Tensor]:
        """Singlestep DPM-Solver-2 via s1 at λ_s + r1·h; returns (x_t, ε̂_s1)."""
        h = t.lam - s.lam
        s1 = model.at_lambda(s.lam + r1 * h)
        x_s1 = exp(s1.log_alpha - s.log_alpha) * x - s1.sigma * expm1(r1 * h) * m_s
        m_s1 = model.eps(x_s1, s1)
        x_t = exp(t.log_alpha - s.log_alpha) * x - t.sigma * expm1(h) * m_s
        if self.solver_type == "dpmsolver":
            x_t = x_t - (0.5 / r1) * t.sigma * expm1(h) * (m_s1 - m_s)
        else:
            x_t = x_t - (1.0 / r1) * t.sigma * (expm1(h) / h - 1.0) * (m_s1 - m_s)
        return x_t, m_s1

    def third_update(self, model: ScheduledModel, x: Tensor, s: Point, t: Point, r1: float, r2: float,
                     m_s: Tensor, m_s1: Tensor | None = None) -> Tensor:
        """Singlestep DPM-Solver-3 via s1, s2 at λ_s + r1·h, λ_s + r2·h."""
        h = t.lam - s.lam
        s1, s2 = model.at_lambda(s.lam + r1 * h), model.at_lambda(s.lam + r2 * h)
        phi_1, phi_22 = expm1(h), expm1(r2 * h) / (r2 * h) - 1.0
        phi_2 = phi_1 / h - 1.0
        if m_s1 is None:
            x_s1 = exp(s1.log_alpha - s.log_alpha) * x - s1.sigma * expm1(r1 * h) * m_s
            m_s1 = model.eps(x_s1, s1)
        x_s2 = (exp(s2.log_alpha - s.log_alpha) * x - s2.sigma * expm1(r2 * h) * m_s
                - (r2 / r1) * s2.sigma * phi_22 * (m_s1 - m_s))
        m_s2 = model.eps(x_s2, s2)
        x_t = exp(t.log_alpha - s.log_alpha) * x - t.sigma * phi_1 * m_s
        if self.solver_type == "dpmsolver":
            return x_t - (1.0 / r2) * t.sigma * phi_2 * (m_s2 - m_s)
        d1_0, d1_1 = (m_s1 - m_s) / r1, (m_s2 - m_s) / r2
        d1 = (r2 * d1_0 - r1 * d1_1) / (r2 - r1)
        d2 = 2.0 * (d1_1 - d1_0) / (r2 - r1)
        return x_t - t.sigma * phi_2 * d1 - t.sigma * (phi_2 / h - 0.5) * d2

    def multistep_update(self, x: Tensor, history: Sequence[Tensor], points: Sequence[Point], t: Point,
                         order: int) -> Tensor:
        """Multistep DPM-Solver of ``order`` from points[-1] to t, using the last model values."""
        p0, m0 = points[-1], history[-1]
        if order == 1:
            return self.first_update(x, p0, t, m0)
        h = t.lam - p0.lam
        r0 = (p0.lam - points[-2].lam) / h
        d1_0 = (m0 - history[-2]) / r0
        x_t = exp(t.log_alpha - p0.log_alpha) * x - t.sigma * expm1(h) * m0
        if order == 2:
            if self.solver_type == "dpmsolver":
                return x_t - 0.5 * t.sigma * expm1(h) * d1_0
            return x_t - t.sigma * (expm1(h) / h - 1.0) * d1_0
        r1 = (points[-2].lam - points[-3].lam) / h
        d1_1 = (history[-2] - history[-3]) / r1
        d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
        d2 = (d1_0 - d1_1) / (r0 + r1)  # as released: half the h²·x'' its coefficient expects (module docstring)
        phi_2 = expm1(h) / h - 1.0
        return x_t - t.sigma * phi_2 * d1 - t.sigma * (phi_2 / h - 0.5) * d2


class DPMSolverPlusPlus(DPMSolverBase):
    """DPM-Solver++ (Lu et al. 2022): exponential integrator on the data prediction x̂0 (robust under guidance)."""

    def model_output(self, model: ScheduledModel, x: Tensor, p: Point) -> Tensor:
        return model.x0(x, p)

    def first_update(self, x: Tensor, s: Point, t: Point, m_s: Tensor) -> Tensor:
        """DPM-Solver++1 (= DDIM): x_t = (σ_t/σ_s)·x − α_t·(e^{−h} − 1)·x̂0_s."""
        h = t.lam - s.lam
        return (t.sigma / s.sigma) * x - t.alpha * expm1(-h) * m_s

    def second_update(self, model: ScheduledModel, x: Tensor, s: Point, t: Point, r1: float,
                      m_s: Tensor) -> tuple[Tensor, Tensor]:
        """Singlestep DPM-Solver++(2S) via s1 at λ_s + r1·h; returns (x_t, x̂0_s1)."""
        h = t.lam - s.lam
        s1 = model.at_lambda(s.lam + r1 * h)
        x_s1 = (s1.sigma / s.sigma) * x - s1.alpha * expm1(-r1 * h) * m_s
        m_s1 = model.x0(x_s1, s1)
        x_t = (t.sigma / s.sigma) * x - t.alpha * expm1(-h) * m_s
        if self.solver_type == "dpmsolver":
            x_t = x_t - (0.5 / r1) * t.alpha * expm1(-h) * (m_s1 - m_s)
        else:
            x_t = x_t + (1.0 / r1) * t.alpha * (expm1(-h) / h + 1.0) * (m_s1 - m_s)
        return x_t, m_s1

    def third_update(self, model: ScheduledModel, x: Tensor, s: Point, t: Point, r1: float, r2: float,
                     m_s: Tensor, m_s1: Tensor | None = None) -> Tensor:
        """Singlestep DPM-Solver++(3S) via s1, s2 at λ_s + r1·h, λ_s + r2·h."""
        h = t.lam - s.lam
        s1, s2 = model.at_lambda(s.lam + r1 * h), model.at_lambda(s.lam + r2 * h)
        phi_1, phi_22 = expm1(-h), expm1(-r2 * h) / (r2 * h) + 1.0
        phi_2 = phi_1 / h + 1.0
        if m_s1 is None:
            x_s1 = (s1.sigma / s.sigma) * x - s1.alpha * expm1(-r1 * h) * m_s
            m_s1 = model.x0(x_s1, s1)
        x_s2 = ((s2.sigma / s.sigma) * x - s2.alpha * expm1(-r2 * h) * m_s
                + (r2 / r1) * s2.alpha * phi_22 * (m_s1 - m_s))
        m_s2 = model.x0(x_s2, s2)
        x_t = (t.sigma / s.sigma) * x - t.alpha * phi_1 * m_s
        if self.solver_type == "dpmsolver":
            return x_t + (1.0 / r2) * t.alpha * phi_2 * (m_s2 - m_s)
        d1_0, d1_1 = (m_s1 - m_s) / r1, (m_s2 - m_s) / r2
        d1 = (r2 * d1_0 - r1 * d1_1) / (r2 - r1)
        d2 = 2.0 * (d1_1 - d1_0) / (r2 - r1)
        return x_t + t.alpha * phi_2 * d1 - t.alpha * (phi_2 / h - 0.5) * d2

    def multistep_update(self, x: Tensor, history: Sequence[Tensor], points: Sequence[Point], t: Point,
                         order: int) -> Tensor:
        """Multistep DPM-Solver++ (2M, 3M) of ``order`` from points[-1] to t."""
        p0, m0 = points[-1], history[-1]
        if order == 1:
            return self.first_update(x, p0, t, m0)
        h = t.lam - p0.lam
        r0 = (p0.lam - points[-2].lam) / h
        d1_0 = (m0 - history[-2]) / r0
        x_t = (t.sigma / p0.sigma) * x - t.alpha * expm1(-h) * m0
        if order == 2:
            if self.solver_type == "dpmsolver":
                return x_t - 0.5 * t.alpha * expm1(-h) * d1_0
            return x_t + t.alpha * (expm1(-h) / h + 1.0) * d1_0
        r1 = (points[-2].lam - points[-3].lam) / h
        d1_1 = (history[-2] - history[-3]) / r1
        d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
        d2 = (d1_0 - d1_1) / (r0 + r1)
        phi_2 = expm1(-h) / h + 1.0
        return x_t + t.alpha * phi_2 * d1 - t.alpha * (phi_2 / h - 0.5) * d2
