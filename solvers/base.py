"""What every solver shares: the options, the time grids, model calls on a schedule, the NFE count.

Solvers never see the backbone: ``eps_fn(x, t) -> eps`` takes continuous schedule time ``t`` as a
(B,) tensor (float32 at least, float64 when ``x`` is; always float64 from ``ddpm`` and ``ddim``, whose
kept training steps float32 cannot hold exactly) and returns the noise prediction, which is cast to
``x``'s dtype (the state keeps its dtype whatever the model's arithmetic). A model with
a learned variance returns ``(eps, v)`` or one tensor with 2C channels ``[eps | v]``; every solver
but DDPM with ``variance="learned"`` uses ``eps`` only.

Coefficients (α, σ, λ at the grid times) are computed once per time as float64 Python numbers
on the CPU, so they cost nothing on the accelerator and keep float64 sampling exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from collections.abc import Sequence
from typing import Annotated, Callable, Union

import torch
from torch import Tensor

from zoo.domains import OneOf, Rule, SolverSteps, Time
from zoo.errors import UserError, did_you_mean

from .schedules import NoiseSchedule

EpsFn = Callable[[Tensor, Tensor], "Tensor | tuple[Tensor, Tensor]"]
SKIP_TYPES = ("time_uniform", "logSNR", "time_quadratic", "karras")
Skip = Annotated[str, OneOf(SKIP_TYPES, "skip")]
Generators = Union[torch.Generator, Sequence[torch.Generator], None]


def refuse_unused(options: dict, why: str, fix: str) -> None:
    """Refuse the options of ``options`` that were given (not ``None``) but would be ignored: an option that
    changes nothing was accepted and the samples were not what the recipe said."""
    given = [name for name, value in options.items() if value is not None]
    if given:
        raise UserError(f"{' and '.join(given)} {'is' if len(given) == 1 else 'are'} unused here: {why}",
                        key_path=given[0], suggestion=fix)


def gaussian_noise(like: Tensor, generator: Generators = None) -> Tensor:
    """Standard normal noise shaped like ``like`` for a stochastic solver step.

    ``generator`` may be one generator for the whole batch or one per sample; with one per
    sample, each sample's noise comes from its own stream, so samples do not depend on how a
    run is split into batches (``zoo sample`` relies on this).
    """
    if isinstance(generator, Sequence):
        if len(generator) != like.shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {like.shape[0]}")
        home = {g.device for g in generator}
        home = home.pop() if len(home) == 1 else torch.device("cpu")
        # Each sample's rows filled in place; CPU draws for a CUDA batch go through pinned memory without
        # blocking, so a solver step does not wait for the model call queued before it.
        pinned = home.type == "cpu" and like.device.type == "cuda"
        noise = torch.empty(like.shape, dtype=like.dtype, device=home, pin_memory=pinned)
        for i, g in enumerate(generator):
            torch.randn(like.shape[1:], generator=g, out=noise[i])
        return noise.to(like.device, non_blocking=pinned)
    return torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)


@dataclass(frozen=True)
class Point:
    """A time on the schedule and its coefficients (float64)."""

    t: float
    log_alpha: float
    alpha: float
    sigma: float
    lam: float


def point(schedule: NoiseSchedule, t: float) -> Point:
    """α, σ and λ at time ``t``, all from log α(t) so that they agree to the last bit."""
    log_alpha = schedule.marginal_log_mean_coeff(torch.tensor(float(t), dtype=torch.float64)).item()
    sigma = math.sqrt(-math.expm1(2.0 * log_alpha))
    return Point(float(t), log_alpha, math.exp(log_alpha), sigma, log_alpha - math.log(sigma))


def _noisy(schedule: NoiseSchedule, t: float) -> bool:
    """σ(t) > 0 at ``t``, where λ and the solvers' steps are defined."""
    log_alpha = schedule.marginal_log_mean_coeff(torch.tensor(float(t), dtype=torch.float64)).item()
    return log_alpha < 0.0


def time_grid(
    schedule: NoiseSchedule, skip: str, t_start: float, t_end: float, n: int, rho: float = 7.0
) -> list[float]:
    """``n + 1`` times from ``t_start`` down to ``t_end`` (DPM-Solver's ``get_time_steps``).

    time_uniform: uniform in t; logSNR: uniform in λ; time_quadratic: uniform in √t (DDIM);
    karras: uniform in σ^{1/ρ} with σ = σ_t/α_t = e^{−λ} (Karras et al. 2022, eq. 5).
    """
    f64 = torch.float64
    if skip == "time_uniform":
        ts = torch.linspace(t_start, t_end, n + 1, dtype=f64)
    elif skip == "time_quadratic":
        ts = torch.linspace(t_start**0.5, t_end**0.5, n + 1, dtype=f64) ** 2
    elif skip == "logSNR":
        lam_start, lam_end = point(schedule, t_start).lam, point(schedule, t_end).lam
        ts = schedule.inverse_lambda(torch.linspace(lam_start, lam_end, n + 1, dtype=f64))
    elif skip == "karras":
        lo, hi = math.exp(-point(schedule, t_end).lam / rho), math.exp(-point(schedule, t_start).lam / rho)
        sigmas = torch.linspace(hi, lo, n + 1, dtype=f64) ** rho
        ts = schedule.inverse_lambda(-torch.log(sigmas))
    else:
        raise UserError(f"unknown skip type {skip!r}; use one of {', '.join(SKIP_TYPES)}",
                        suggestion=did_you_mean(skip, SKIP_TYPES))
    return ts.tolist()


def split_model_output(out: "Tensor | Sequence[Tensor]", x: Tensor) -> tuple[Tensor, Tensor | None]:
    """``(eps, v)`` from a model output: a pair, a 2C-channel tensor ``[eps | v]``, or eps alone.

    Anything else is a :class:`UserError`: a DiMR called as ``eps_fn`` returns one prediction per
    branch, whose first (lowest-resolution) one used to be taken as ε̂ and fail in a broadcast.
    """
    if isinstance(out, (tuple, list)):
        if len(out) == 2 and all(isinstance(o, Tensor) for o in out) and out[0].shape == x.shape:
            return out[0], out[1]
        shapes = ", ".join(str(tuple(o.shape)) if isinstance(o, Tensor) else type(o).__name__ for o in out)
        raise UserError(f"eps_fn returned a {type(out).__name__} of {len(out)} ({shapes}); it must return ε̂ "
                        f"shaped like x {tuple(x.shape)}, or the pair (ε̂, v)",
                        suggestion="a DiMR returns one prediction per branch, lowest resolution first: "
                        "return its last, out[-1]")
    if not isinstance(out, Tensor):
        raise UserError(f"eps_fn returned {type(out).__name__}; it must return ε̂ shaped like x {tuple(x.shape)}")
    if out.dim() >= 2 and x.dim() >= 2 and out.shape[1] == 2 * x.shape[1] and out.shape[2:] == x.shape[2:]:
        eps, v = out.chunk(2, dim=1)
        return eps, v
    if out.shape != x.shape:
        raise UserError(f"eps_fn returned shape {tuple(out.shape)}; it must return ε̂ shaped like x {tuple(x.shape)} "
                        f"(or [ε̂ | v] with {2 * x.shape[1] if x.dim() >= 2 else '2C'} channels)")
    return out, None


class ScheduledModel:
    """``eps_fn`` bound to a schedule: evaluates it at schedule points and counts the calls.

    ``exact_time``: t is given in float64 whatever x's dtype. The chain solvers (DDPM, DDIM) walk the
    training steps, t = (n+1)/N: in float32, 8 of DiT's 250 kept steps reached the model as 7.9999995 or
    502.00003 where DiT feeds the integer step."""

    def __init__(self, eps_fn: EpsFn, schedule: NoiseSchedule, exact_time: bool = False):
        if not hasattr(schedule, "discrete"):  # duck-typed: a plugin schedule need not subclass NoiseSchedule
            raise UserError(f"a solver samples on a NoiseSchedule, got {type(schedule).__name__} {schedule!r}"[:160],
                            suggestion="build one with zoo.solvers.build_schedule('linear'), or pass the recipe's")
        if not callable(eps_fn):
            raise UserError(f"eps_fn must be callable as eps_fn(x, t), got {type(eps_fn).__name__}")
        self.eps_fn, self.schedule, self.nfe, self.exact_time = eps_fn, schedule, 0, exact_time

    def at(self, t: float) -> Point:
        return point(self.schedule, t)

    def at_lambda(self, lam: float) -> Point:
        """The point whose half log-SNR is ``lam`` (via the schedule's inverse)."""
        return point(self.schedule, self.schedule.inverse_lambda(torch.tensor(lam, dtype=torch.float64)).item())

    def eps_and_v(self, x: Tensor, p: Point) -> tuple[Tensor, Tensor | None]:
        """The model's noise prediction at ``p`` (and its variance output, if it has one)."""
        self.nfe += 1
        t_dtype = torch.float64 if self.exact_time else torch.promote_types(x.dtype, torch.float32)  # never half
        t = torch.full((x.shape[0],), p.t, dtype=t_dtype, device=x.device)
        eps, v = split_model_output(self.eps_fn(x, t), x)  # a float64 t may promote a float32 model's ε̂
        return eps.to(x.dtype), None if v is None else v.to(x.dtype)

    def eps(self, x: Tensor, p: Point) -> Tensor:
        return self.eps_and_v(x, p)[0]

    def x0(self, x: Tensor, p: Point) -> Tensor:
        """The data prediction x̂_0 = (x − σ·ε̂)/α."""
        return (x - p.sigma * self.eps(x, p)) / p.alpha


def check_choice(what: str, value: object, choices: Sequence) -> None:
    """Raise a :class:`UserError` naming ``what`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise UserError(f"{what} must be one of {', '.join(map(str, choices))}, got {value!r}",
                        suggestion=did_you_mean(str(value), [str(c) for c in choices]))


class Solver:
    """Base of all solvers: ``sample(eps_fn, x_T, schedule)`` from t_start down to t_end.

    ``t_start``/``t_end`` default to the schedule's ``T`` and ``eps`` (1 and 1/N for discrete
    schedules). ``nfe`` is the number of model calls of the last :meth:`sample`.
    """

    rho: float = 7.0  # the ρ of skip="karras" (Karras et al. 2022)

    constraints = (Rule("t_end < t_start", lambda t_start, t_end: t_start is None or t_end is None or t_end < t_start,
                        ("t_start", "t_end")),)

    def __init__(self, steps: SolverSteps = 20, skip: Skip = "time_uniform", t_start: Time | None = None,
                 t_end: Time | None = None):
        if not isinstance(steps, int) or steps < 1:
            raise UserError(f"steps must be a positive integer, got {steps!r}")
        check_choice("skip", skip, SKIP_TYPES)
        self.steps, self.skip, self.t_start, self.t_end = steps, skip, t_start, t_end
        self.nfe = 0

    def time_range(self, schedule: NoiseSchedule) -> tuple[float, float]:
        t_start = schedule.T if self.t_start is None else float(self.t_start)
        t_end = schedule.eps if self.t_end is None else float(self.t_end)
        if not 0.0 < t_end < t_start:
            key = "t_start" if self.t_start is not None and (self.t_end is None or t_start <= 0.0) else "t_end"
            raise UserError(f"need 0 < t_end < t_start, got t_start={t_start}, t_end={t_end}",
                            key_path=f"sample.solver.{key}",
                            suggestion=f"{repr(schedule)} runs from t = {schedule.eps} to {schedule.T}: choose "
                            "t_end < t_start within it, or leave them unset")
        if t_start > schedule.T:  # past T the schedule's alpha vanishes (cosine) or is extrapolated
            raise UserError(f"t_start {t_start} is past the end of {schedule!r} (T = {schedule.T})",
                            key_path="sample.solver.t_start", suggestion=f"use t_start <= {schedule.T} or leave it unset")
        if t_end < schedule.eps and not _noisy(schedule, t_end):  # sigma(t_end) = 0: no noise level to stop at
            raise UserError(f"t_end {t_end} is below the first noise level of {schedule!r} (t = {schedule.eps})",
                            key_path="sample.solver.t_end", suggestion=f"use t_end >= {schedule.eps} or leave it unset")
        return t_start, t_end

    def grid(self, schedule: NoiseSchedule, n: int | None = None) -> list[Point]:
        """The ``n + 1`` (default ``steps + 1``) points of this solver's time grid."""
        t_start, t_end = self.time_range(schedule)
        times = time_grid(schedule, self.skip, t_start, t_end, self.steps if n is None else n, rho=self.rho)
        return [point(schedule, t) for t in times]

    @property
    def batch_coupled(self) -> bool:
        """True when the samples of one batch share step sizes chosen from all of them (adaptive step
        control, as in the official DPM-Solver and torchdiffeq): each image then depends on the
        others in its batch, so on the batch size. Fixed-grid solvers are False."""
        return False

    def sample(self, eps_fn: EpsFn, x_T: Tensor, schedule: NoiseSchedule,
               generator: Generators = None) -> Tensor:
        """Integrate from ``x_T`` at t_start to t_end; ``generator`` (one, or one per sample) drives stochastic solvers."""
        raise NotImplementedError

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if k != "nfe" and not k.startswith("_"))
        return f"{type(self).__name__}({options})"
