"""DDIM (Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models", eq. 12).

From s to t on the solver's time grid, with x̂0 = (x_s − σ_s·ε̂)/α_s:

    x_t = α_t·x̂0 + √(σ_t² − c²)·ε̂ + c·z,   c = η·(σ_t/σ_s)·√(1 − α_s²/α_t²)

η = 0 is the deterministic DDIM (identical to DPM-Solver-1 and to Euler in σ = σ_t/α_t);
η = 1 adds as much fresh noise as ancestral DDPM sampling on the same grid.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from zoo.errors import UserError

from .base import EpsFn, Generators, ScheduledModel, Solver, gaussian_noise
from .schedules import NoiseSchedule


class DDIMSolver(Solver):
    """DDIM sampling (Song et al. 2021) on a continuous time grid; ``eta`` > 0 makes it stochastic."""

    def __init__(self, steps: int = 50, eta: float = 0.0, skip: str = "time_uniform",
                 t_start: float | None = None, t_end: float | None = None):
        super().__init__(steps=steps, skip=skip, t_start=t_start, t_end=t_end)
        if eta < 0:
            raise UserError(f"ddim eta must be >= 0, got {eta}")
        self.eta = eta

    @torch.no_grad()
    def sample(self, eps_fn: EpsFn, x_T: Tensor, schedule: NoiseSchedule,
               generator: Generators = None) -> Tensor:
        model = ScheduledModel(eps_fn, schedule)
        grid = self.grid(schedule)
        x = x_T
        for s, t in zip(grid[:-1], grid[1:]):
            eps = model.eps(x, s)
            x0 = (x - s.sigma * eps) / s.alpha
            if self.eta == 0:
                x = t.alpha * x0 + t.sigma * eps
                continue
            c = self.eta * (t.sigma / s.sigma) * math.sqrt(max(0.0, -math.expm1(2 * (s.log_alpha - t.log_alpha))))
            c = min(c, t.sigma)
            z = gaussian_noise(x, generator)
            x = t.alpha * x0 + math.sqrt(t.sigma**2 - c**2) * eps + c * z
        self.nfe = model.nfe
        return x
