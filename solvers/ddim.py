"""DDIM (Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models", eq. 12).

From noise level ᾱ to ᾱ_prev, with x̂0 = (x − √(1 − ᾱ)·ε̂)/√ᾱ and ε̂ recomputed from x̂0:

    x_prev = √ᾱ_prev·x̂0 + √(1 − ᾱ_prev − c²)·ε̂ + c·z,   c = η·√((1 − ᾱ_prev)/(1 − ᾱ))·√(1 − ᾱ/ᾱ_prev)

η = 0 is deterministic (the same step as DPM-Solver-1 and as Euler in σ = σ_t/α_t); η = 1 adds
as much fresh noise as ancestral DDPM sampling on the same chain.

* ``ddim`` — ADM/DiT's ``ddim_sample_loop``: the respaced chain of kept training steps (``steps``
  or a ``respacing`` string, as ``ddpm``; DiT's ``create_diffusion("ddim25")`` is
  ``respacing="ddim25"``, ``create_diffusion("25")`` is ``steps=25``), ending at ᾱ_prev = 1,
  i.e. with x̂0 at the first kept step; ``clip_denoised`` as ADM's.
* ``ddim_grid`` — DDIM on a DPM-Solver time grid (``skip``, from t_start to t_end, no final
  denoising): with η = 0 exactly DPM-Solver-1 on the same grid.
"""

from __future__ import annotations

import math
from typing import Annotated, Callable

import torch
from torch import Tensor

from zoo.domains import Range, SolverSteps, Time
from zoo.errors import UserError

from .base import EpsFn, Generators, ScheduledModel, Skip, Solver, gaussian_noise, point
from .respacing import ChainSolver
from .schedules import NoiseSchedule


def _check_eta(eta: float) -> float:
    if not isinstance(eta, (int, float)) or not 0 <= eta <= 1:
        raise UserError(f"ddim eta must be a number in [0, 1] (0: deterministic, 1: DDPM's variance), got {eta!r}")
    return float(eta)


def ddim_step(x0: Tensor, eps: Tensor, abar: float, abar_prev: float, eta: float,
              noise: Callable[[], Tensor]) -> Tensor:
    """One DDIM step (eq. 12) from ᾱ to ᾱ_prev; ``noise()`` is drawn only when c > 0."""
    c = eta * math.sqrt((1.0 - abar_prev) / (1.0 - abar)) * math.sqrt(max(0.0, 1.0 - abar / abar_prev))
    x = math.sqrt(abar_prev) * x0 + math.sqrt(max(0.0, 1.0 - abar_prev - c * c)) * eps
    return x + c * noise() if c > 0 else x


# DDIM's η: 0 is deterministic, 1 DDPM's posterior variance; above 1 the noise would exceed what the
# step leaves (sqrt of a negative, NaN in ADM's code; a silent clamp here before)
Eta = Annotated[float, Range(0, 1)]


class DDIMSolver(ChainSolver):
    """DDIM on the respaced chain, as ADM/DiT's ``ddim_sample_loop``; ``eta`` > 0 makes it stochastic."""

    default_steps = 50

    def __init__(self, steps: SolverSteps | None = None, respacing: str | int | None = None, eta: Eta = 0.0,
                 clip_denoised: bool = False, skip: Skip | None = None, t_start: Time | None = None,
                 t_end: Time | None = None):
        super().__init__(steps=steps, respacing=respacing, clip_denoised=clip_denoised, skip=skip,
                         t_start=t_start, t_end=t_end)
        self.eta = _check_eta(eta)

    @torch.no_grad()
    def sample(self, eps_fn: EpsFn, x_T: Tensor, schedule: NoiseSchedule,
               generator: Generators = None) -> Tensor:
        model = ScheduledModel(eps_fn, schedule, exact_time=True)  # the chain's steps, as integers
        times, abar = self.chain(schedule)
        x = x_T
        for i in reversed(range(len(times))):
            eps = model.eps(x, point(schedule, times[i]))
            x0 = self.predict_x0(x, eps, abar[i])
            eps = self.eps_from_x0(x, x0, abar[i])
            abar_prev = abar[i - 1] if i > 0 else 1.0  # the last step lands on x̂0
            x = ddim_step(x0, eps, abar[i], abar_prev, self.eta, lambda: gaussian_noise(x, generator))
        self.nfe = model.nfe
        return x


class DDIMGridSolver(Solver):
    """DDIM on a continuous time grid (DPM-Solver's conventions, ends at t_end); ``eta`` > 0 makes it stochastic."""

    def __init__(self, steps: SolverSteps = 50, eta: Eta = 0.0, skip: Skip = "time_uniform",
                 t_start: Time | None = None, t_end: Time | None = None):
        super().__init__(steps=steps, skip=skip, t_start=t_start, t_end=t_end)
        self.eta = _check_eta(eta)

    @torch.no_grad()
    def sample(self, eps_fn: EpsFn, x_T: Tensor, schedule: NoiseSchedule,
               generator: Generators = None) -> Tensor:
        model = ScheduledModel(eps_fn, schedule)
        grid = self.grid(schedule)
        x = x_T
        for s, t in zip(grid[:-1], grid[1:]):
            eps = model.eps(x, s)
            x0 = (x - s.sigma * eps) / s.alpha
            x = ddim_step(x0, eps, s.alpha**2, t.alpha**2, self.eta, lambda: gaussian_noise(x, generator))
        self.nfe = model.nfe
        return x
