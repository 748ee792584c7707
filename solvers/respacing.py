"""Respaced chains (Nichol & Dhariwal 2021, "Improved DDPM"): the training steps a sampler keeps.

ADM, iDDPM and DiT sample a model trained on N steps with a shorter chain of kept steps
k_0 < ... < k_{S−1}, named by a respacing string (DiT: ``create_diffusion("250")``):

* ``"25"`` or sections ``"10,15,20"``: the N steps are split into equal sections (the first
  N mod #sections get one step more); a section of size s keeping c steps takes the steps
  start + round(i·(s − 1)/(c − 1)), the fractional stride accumulated step by step (c = 1: its
  first step). One section of 1000 keeping 25 gives 0, 42, 83, 125, ..., 999.
* ``"ddimN"``: every i-th step from 0, with the integer stride i ∈ 1..N−1 that gives exactly N
  steps (``"ddim25"`` on 1000: 0, 40, ..., 960); an error if no stride does.

The chain's noise levels are the kept ᾱ_{k_i}, so its betas are β_i = 1 − ᾱ_{k_i}/ᾱ_{k_{i−1}}
(ᾱ before k_0 is 1), and the model is called with the ORIGINAL step k_i — in solver time
t = (k_i + 1)/N, which the time maps turn back into k_i (DiT) or k_i + 1 (U-ViT, DiMR).
:class:`ChainSolver` is the base of the samplers that walk such a chain (``ddpm``, ``ddim``).
"""

from __future__ import annotations

import math

from torch import Tensor

from zoo.errors import UserError

from .base import Solver, point, time_grid
from .schedules import NoiseSchedule


def _parse(spec: str | int) -> tuple[bool, list[int]]:
    """``(is_ddim_stride, counts)`` of a respacing string; a malformed one is a UserError."""
    text = str(spec).strip()
    is_ddim = text.startswith("ddim")
    body = text[len("ddim"):] if is_ddim else text
    try:
        counts = [int(part) for part in body.split(",")]
    except ValueError:
        counts = []
    if not counts or (is_ddim and len(counts) != 1) or min(counts) < 0 or sum(counts) < 1:
        raise UserError(f"respacing {spec!r} is not a step count ('250'), sections ('10,15,20') or 'ddimN' ('ddim25')")
    return is_ddim, counts


def respacing_count(spec: str | int) -> int:
    """The number of kept steps a respacing string asks for (without the schedule's N)."""
    return sum(_parse(spec)[1])


def space_timesteps(num_steps: int, spec: str | int) -> list[int]:
    """The kept training steps (sorted, 0-based) of ``spec`` on a chain of ``num_steps`` (ADM's rule)."""
    is_ddim, counts = _parse(spec)
    if is_ddim:
        for stride in range(1, num_steps):
            if len(range(0, num_steps, stride)) == counts[0]:
                return list(range(0, num_steps, stride))
        if counts[0] > num_steps:
            hint = f"keep at most {num_steps} ('ddim{num_steps}' keeps every step)"
        elif counts[0] < 2:  # one kept step is step 0, where the image is mostly signal
            hint = "keep 2 or more steps, or use the ddim_grid solver (a time grid from pure noise) for one"
        else:
            hint = f"use {counts[0]} (evenly spaced with a fractional stride) instead"
        raise UserError(f"respacing {spec!r}: no integer stride keeps exactly {counts[0]} of {num_steps} steps",
                        suggestion=hint)
    size_per, extra = divmod(num_steps, len(counts))
    kept, start = [], 0
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise UserError(f"respacing {spec!r}: cannot keep {count} steps of a section of {size} "
                            f"({num_steps} training steps in {len(counts)} section{'s' * (len(counts) > 1)})",
                            suggestion=f"keep at most {size} per section" if len(counts) > 1
                            else f"keep at most {num_steps}")
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0
        for _ in range(count):
            kept.append(start + round(position))
            position += stride
        start += size
    return sorted(set(kept))


class ChainSolver(Solver):
    """Base of the samplers on a chain of noise levels, least noisy first, ending with x̂0.

    On a discrete schedule the chain is the respaced training chain: ``respacing`` (a string
    above) or ``steps`` (= ``respacing=str(steps)``). On a continuous schedule it is ``steps``
    points of the solver's ``skip`` grid (default time_uniform) between t_end and t_start, with
    ᾱ = α(t)²; a discrete chain has no grid, so ``skip`` there is refused, not ignored.
    ``clip_denoised`` clamps x̂0 to [−1, 1] (ADM's option; DiT samples latents with it off).
    """

    default_steps = 50

    def __init__(self, steps: int | None = None, respacing: str | int | None = None, clip_denoised: bool = False,
                 skip: str | None = None, t_start: float | None = None, t_end: float | None = None):
        if respacing is not None:
            count = respacing_count(respacing)
            if steps is not None and steps != count:
                raise UserError(f"steps={steps} disagrees with respacing {str(respacing)!r} ({count} steps); give one of them")
            steps, respacing = count, str(respacing)
        super().__init__(steps=self.default_steps if steps is None else steps, skip=skip or "time_uniform",
                         t_start=t_start, t_end=t_end)
        self._skip_given = skip is not None
        self.respacing, self.clip_denoised = respacing, bool(clip_denoised)

    def chain(self, schedule: NoiseSchedule) -> tuple[list[float], list[float]]:
        """The model times and ᾱ of the chain, least noisy first."""
        name = type(self).__name__
        if schedule.discrete:
            if self.t_start is not None or self.t_end is not None:
                raise UserError(f"{name} on a discrete schedule walks the respaced training chain; drop t_start/t_end "
                                "(choose the kept steps with respacing)")
            if self._skip_given:
                raise UserError(f"{name} on a discrete schedule walks the respaced training chain; skip={self.skip!r} "
                                "would be ignored", key_path="sample.solver.skip",
                                suggestion="drop skip (choose the kept steps with respacing, e.g. 'ddim25')")
            n = schedule.num_steps
            if self.respacing is None and self.steps > n:  # said as the steps asked for, not as a respacing
                raise UserError(f"{self.steps} steps are more than the schedule's {n} training steps ({name} walks "
                                "a subset of them)",
                                key_path="sample.solver.steps", suggestion=f"use steps <= {n}")
            spec = self.respacing or str(self.steps)
            kept = space_timesteps(n, spec)
            abars = [schedule.alphas_cumprod[k].item() for k in kept]
            # The respacing dropped every noisy step (a schedule that ends there is the schedule's own):
            # x_T ~ N(0, I) given at a step that is mostly signal comes back as the sample.
            if kept[-1] < n - 1 and abars[-1] > 0.5:
                raise UserError(
                    f"{name} with respacing {spec!r} starts at training step {kept[-1]} of {n}, where ᾱ = "
                    f"{abars[-1]:.4g} is mostly signal: started from pure noise there, the chain returns the noise "
                    "(ADM's respacing keeps only step 0 for one step)",
                    suggestion="use 2 or more steps, or the ddim_grid solver (a time grid from pure noise) for one")
            return [(k + 1) / n for k in kept], abars
        if self.respacing is not None:
            raise UserError(f"respacing needs a discrete schedule; {schedule!r} is continuous: give steps (and skip)")
        t_start, t_end = self.time_range(schedule)
        times = time_grid(schedule, self.skip, t_start, t_end, self.steps - 1)[::-1]
        return times, [point(schedule, t).alpha ** 2 for t in times]

    def predict_x0(self, x: Tensor, eps: Tensor, abar: float) -> Tensor:
        """x̂0 = √(1/ᾱ)·x − √(1/ᾱ − 1)·ε̂, clamped to [−1, 1] with ``clip_denoised``."""
        x0 = math.sqrt(1.0 / abar) * x - math.sqrt(1.0 / abar - 1.0) * eps
        return x0.clamp(-1.0, 1.0) if self.clip_denoised else x0

    @staticmethod
    def eps_from_x0(x: Tensor, x0: Tensor, abar: float) -> Tensor:
        """The ε̂ consistent with x̂0 at ᾱ: (√(1/ᾱ)·x − x̂0)/√(1/ᾱ − 1)."""
        return (math.sqrt(1.0 / abar) * x - x0) / math.sqrt(1.0 / abar - 1.0)


__all__ = ["ChainSolver", "respacing_count", "space_timesteps"]
