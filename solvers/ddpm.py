"""Ancestral DDPM sampling (Ho et al. 2020), respaced as in Improved DDPM (Nichol & Dhariwal 2021).

The chain keeps S of the N training steps, k_0 < ... < k_{S−1} (ADM's ``space_timesteps``:
``steps`` or a ``respacing`` string such as "250", "10,15,20" or "ddim25"; see
:mod:`zoo.solvers.respacing`), and rebuilds its betas from the kept ᾱ: β_i = 1 − ᾱ_{k_i}/ᾱ_{k_{i−1}}
(ᾱ before the first is 1). Each step draws from the posterior q(x_{i−1} | x_i, x̂0):

    mean = β_i·√ᾱ_{i−1}/(1 − ᾱ_i)·x̂0 + (1 − ᾱ_{i−1})·√(1 − β_i)/(1 − ᾱ_i)·x_i,
    β̃_i = β_i·(1 − ᾱ_{i−1})/(1 − ᾱ_i)

with variance ``fixed_small`` β̃_i, ``fixed_large`` β_i, or ``learned`` (iDDPM eq. 15)
exp(f·log β_i + (1 − f)·log β̃_i), f = (v + 1)/2, where the model returns its variance output v
in [−1, 1] beside ε: ``eps_fn`` returns ``(eps, v)`` or 2C channels ``[eps | v]`` (as DiT does).
The last step returns the mean, i.e. x̂0 at the first kept step (no noise is added). This is
ADM/DiT's ``p_sample_loop`` (DiT: ``create_diffusion("250")``, learned σ, ``clip_denoised=False``).

On a discrete schedule the model is called at t = (k_i + 1)/N; on a continuous one the chain is
built from ``steps`` points of the solver's grid between t_end and t_start with ᾱ = α(t)².
"""

from __future__ import annotations

import math
from typing import Annotated

import torch
from torch import Tensor

from zoo.domains import OneOf, SolverSteps, Time
from zoo.errors import UserError

from .base import EpsFn, Generators, ScheduledModel, Skip, check_choice, gaussian_noise, point
from .respacing import ChainSolver
from .schedules import NoiseSchedule

VARIANCES = ("fixed_small", "fixed_large", "learned")


class DDPMSolver(ChainSolver):
    """Ancestral DDPM sampling on the respaced chain (Ho et al. 2020; Nichol & Dhariwal 2021)."""

    default_steps = 250

    def __init__(self, steps: SolverSteps | None = None, respacing: str | int | None = None,
                 variance: Annotated[str, OneOf(VARIANCES, "variance")] = "fixed_small",
                 clip_denoised: bool = False, skip: Skip | None = None, t_start: Time | None = None,
                 t_end: Time | None = None):
        super().__init__(steps=steps, respacing=respacing, clip_denoised=clip_denoised, skip=skip,
                         t_start=t_start, t_end=t_end)
        check_choice("ddpm variance", variance, VARIANCES)
        self.variance = variance

    @torch.no_grad()
    def sample(self, eps_fn: EpsFn, x_T: Tensor, schedule: NoiseSchedule,
               generator: Generators = None) -> Tensor:
        model = ScheduledModel(eps_fn, schedule, exact_time=True)  # the chain's steps, as integers
        times, abar = self.chain(schedule)
        abar_prev = [1.0] + abar[:-1]
        betas = [1.0 - a / ap for a, ap in zip(abar, abar_prev)]
        post_var = [b * (1.0 - ap) / (1.0 - a) for b, a, ap in zip(betas, abar, abar_prev)]
        x = x_T
        for i in reversed(range(len(times))):
            eps, v = model.eps_and_v(x, point(schedule, times[i]))
            x0 = self.predict_x0(x, eps, abar[i])
            mean = (betas[i] * math.sqrt(abar_prev[i]) / (1.0 - abar[i])) * x0 \
                + ((1.0 - abar_prev[i]) * math.sqrt(1.0 - betas[i]) / (1.0 - abar[i])) * x
            if i == 0:
                x = mean
                break
            z = gaussian_noise(x, generator)
            x = mean + torch.exp(0.5 * self._log_variance(betas[i], post_var[i], v, x)) * z
        self.nfe = model.nfe
        return x

    def _log_variance(self, beta: float, post_var: float, v: Tensor | None, x: Tensor) -> Tensor:
        if self.variance == "fixed_small":
            return torch.full_like(x, math.log(post_var))
        if self.variance == "fixed_large":
            return torch.full_like(x, math.log(beta))
        if v is None:
            raise UserError("ddpm variance='learned' needs eps_fn to return (eps, v) or 2C channels [eps | v]")
        frac = (v.to(x.dtype) + 1.0) / 2.0
        return frac * math.log(beta) + (1.0 - frac) * math.log(post_var)
