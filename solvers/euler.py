"""Euler and Heun steps on the probability-flow ODE in Karras form (Karras et al. 2022, Algorithm 1).

With σ = σ_t/α_t = e^{−λ} and the rescaled state x̃ = x/α_t, the VP probability-flow ODE becomes
dx̃/dσ = ε̂(α·x̃, t), the EDM ODE with D = x̃ − σ·ε̂. Between grid points σ_i → σ_{i+1}:

    Euler:  x̃_{i+1} = x̃_i + (σ_{i+1} − σ_i)·d_i,                   d_i = ε̂(x_i, t_i)
    Heun:   x̃_{i+1} = x̃_i + (σ_{i+1} − σ_i)·(d_i + d'_{i+1})/2,    d'_{i+1} = ε̂ at the Euler point

The default grid is Karras' ρ = 7 spacing in σ (``skip="karras"``); any DPM-Solver skip type
works. Euler in σ is exactly DDIM (η = 0) on the same grid. ``steps`` counts intervals: Euler makes
``steps`` model calls, Heun 2·``steps`` (the grid ends at σ(t_end) > 0, so every step is corrected).
"""

from __future__ import annotations

import torch
from torch import Tensor

from zoo.domains import PositiveFloat, SolverSteps, Time

from .base import EpsFn, Generators, ScheduledModel, Skip, Solver, refuse_unused
from .schedules import NoiseSchedule


class EulerSolver(Solver):
    """Euler's method in σ = σ_t/α_t (Karras et al. 2022); first order, one call per step."""

    heun = False

    def __init__(self, steps: SolverSteps = 50, skip: Skip = "karras", t_start: Time | None = None,
                 t_end: Time | None = None, rho: PositiveFloat | None = None):
        """``rho`` (default 7) shapes the karras grid only."""
        if skip != "karras":
            refuse_unused({"rho": rho}, f"it shapes only skip karras's grid, not {skip}'s", "drop it, or set skip: karras")
        super().__init__(steps=steps, skip=skip, t_start=t_start, t_end=t_end)
        self.rho = 7.0 if rho is None else rho

    @torch.no_grad()
    def sample(self, eps_fn: EpsFn, x_T: Tensor, schedule: NoiseSchedule,
               generator: Generators = None) -> Tensor:
        model = ScheduledModel(eps_fn, schedule)
        grid = self.grid(schedule)
        x = x_T / grid[0].alpha  # x̃ = x/α
        for s, t in zip(grid[:-1], grid[1:]):
            sigma_s, sigma_t = s.sigma / s.alpha, t.sigma / t.alpha
            d = model.eps(s.alpha * x, s)
            x_next = x + (sigma_t - sigma_s) * d
            if self.heun:
                d_next = model.eps(t.alpha * x_next, t)
                x_next = x + (sigma_t - sigma_s) * (d + d_next) / 2
            x = x_next
        self.nfe = model.nfe
        return grid[-1].alpha * x


class HeunSolver(EulerSolver):
    """Heun's second-order method in σ = σ_t/α_t (Karras et al. 2022, Algorithm 1); two calls per step."""

    heun = True
