"""Classifier-free guidance (Ho & Salimans 2022): a backbone wrapped into a solver's ``eps_fn``.

Two conventions for the same rule, named by the codebase that uses them:

* ``dit``  — ε = ε_u + w·(ε_c − ε_u); w = 1 is no guidance (DiT: w = 1.5 for FID, 4.0 for visuals).
* ``uvit`` — ε = ε_c + s·(ε_c − ε_u); s = 0 is no guidance (U-ViT/DiMR: s = 0.4 at 256², 0.7 at 512²).
  The two agree when w = 1 + s.

The conditional and unconditional passes run as ONE forward on the batch [x; x] with labels
[y; null]. Options:

* ``channels`` — guide only the first k ε channels (DiT's sampler guides 3 of its 4 latent
  channels, a reproduction quirk); the rest come from the conditional pass.
* learned-σ models (``learn_sigma``; output [ε | v], 2C channels) — guidance acts on ε only,
  the variance channels come from the conditional half.
* DiMR returns one prediction per branch, lowest resolution first: the last is used.
* ``power`` — DiMR's released sampler decays the guidance towards high noise: with the
  DiT-style scale w and p = ``power``, w(t) = 1 + (w − 1)·(1 − cos(π·(1 − t)^p))/2 with t the
  solver's continuous time (DiMR computes 1 − n/1000 with n = 1000·t, the same for N = 1000).
  So w(1) = 1 (no guidance at pure noise) and w(t) → w as t → 0; a larger p keeps it off longer.
  In the ``uvit`` convention the same factor multiplies s.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable

import torch
from torch import Tensor, nn

from zoo.conditioning.base import as_time_vector

from .denoiser import Denoiser
from .objectives import v_to_eps

if TYPE_CHECKING:
    from zoo.solvers.schedules import NoiseSchedule

CONVENTIONS = ("dit", "uvit")


def to_dit_scale(scale: float, convention: str) -> float:
    """The DiT-style w of a scale given in ``convention`` (w = 1 + s for ``uvit``)."""
    if convention == "dit":
        return float(scale)
    if convention == "uvit":
        return 1.0 + float(scale)
    raise ValueError(f"unknown guidance convention {convention!r}; choose 'dit' (w) or 'uvit' (s = w - 1)")


def power_schedule(t: Tensor, power: float) -> Tensor:
    """DiMR's guidance decay factor (1 − cos(π·(1 − t)^p))/2: 0 at t = 1, 1 at t = 0."""
    return (1.0 - torch.cos(math.pi * (1.0 - t).clamp(min=0.0) ** power)) / 2.0


def guidance_weight(t: Tensor, w: float, power: float | None = None) -> Tensor | float:
    """The DiT-style weight at time ``t``: constant w, or 1 + (w − 1)·power_schedule(t, p)."""
    if power is None:
        return w
    return 1.0 + (w - 1.0) * power_schedule(t, power)


def combine(cond: Tensor, uncond: Tensor, weight: Tensor | float, channels: int | None = None) -> Tensor:
    """ε_u + w·(ε_c − ε_u) on the first ``channels`` channels of ``cond`` (all if None); the rest from ``cond``.

    ``weight`` is a number or a per-sample tensor (B,).
    """
    if torch.is_tensor(weight) and weight.ndim == 1:
        weight = weight.view(-1, *([1] * (cond.ndim - 1))).to(cond.dtype)
    k = cond.shape[1] if channels is None else channels
    guided = uncond[:, :k] + weight * (cond[:, :k] - uncond[:, :k])
    if k == cond.shape[1]:
        return guided
    return torch.cat([guided, cond[:, k:]], dim=1)


def _last(out):
    """DiMR returns per-branch predictions, lowest resolution first: keep the model's (the last)."""
    return out[-1] if isinstance(out, (list, tuple)) else out


class GuidedModel:
    """``eps_fn(x, t)`` for a solver: the backbone's ε at continuous time t, guided or not.

    Args:
        model: ``model(x, t_input, y)``.
        time_map: continuous t → the backbone's time input (:mod:`~zoo.diffusion.time_input`).
        y: class labels (B,) or None (unconditional).
        scale: guidance scale in ``convention``; ``None`` (or no guidance: w = 1) runs one pass.
        null_label: the label of the unconditional pass.
        channels: guide only the first ``channels`` ε channels (DiT: 3).
        power: DiMR's time-dependent decay (see module doc), or None.
        eps_channels: the number of ε channels (= data channels); further output channels are
            a learned variance ([ε | v]) and are taken from the conditional pass, unguided.
        v_schedule: for a v-prediction model, its noise schedule: the guided v is turned into
            ε = σ_t·x + α_t·v (guiding v or ε is the same, the map is affine with shared weights).
    """

    def __init__(
        self,
        model: nn.Module | Callable,
        time_map: Callable[[Tensor], Tensor],
        y: Tensor | None = None,
        scale: float | None = None,
        convention: str = "dit",
        null_label: int | None = None,
        channels: int | None = None,
        power: float | None = None,
        eps_channels: int | None = None,
        v_schedule: "NoiseSchedule | None" = None,
    ):
        self.model = model
        self.v_schedule = v_schedule
        self.time_map = time_map
        self.denoiser = Denoiser(model, time_map, null_label)
        self.y = y
        self.w = None if scale is None else to_dit_scale(scale, convention)
        if self.w is not None and self.w == 1.0:
            self.w = None  # w = 1 (also 1 + 0·decay under a power) is the conditional prediction: one pass
        if self.w is not None and (y is None or null_label is None):
            raise ValueError("classifier-free guidance needs class labels and the null label")
        self.null_label = null_label
        self.channels = channels
        self.power = power
        self.eps_channels = eps_channels

    @property
    def guided(self) -> bool:
        return self.w is not None

    def full_output(self, x: Tensor, t: Tensor) -> Tensor:
        """The (guided) model output with all its channels ([ε | v] for learned-σ models)."""
        t = as_time_vector(t, x.shape[0], x.device)
        # .to(x.dtype): under bf16/fp16 autocast (zoo.precision) the solver and the guidance still add in float32
        if not self.guided:
            return _last(self.denoiser(x, t, self.y)).to(x.dtype)
        drop = torch.arange(2 * x.shape[0], device=x.device) >= x.shape[0]  # the second half unconditional
        out = _last(self.denoiser(torch.cat([x, x]), torch.cat([t, t]), torch.cat([self.y, self.y]), drop)).to(x.dtype)
        cond, uncond = out.chunk(2, dim=0)
        c = self.eps_channels if self.eps_channels is not None else cond.shape[1]
        k = c if self.channels is None else min(self.channels, c)
        guided = combine(cond[:, :c], uncond[:, :c], guidance_weight(t, self.w, self.power), k)
        return torch.cat([guided, cond[:, c:]], dim=1) if c < cond.shape[1] else guided

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        """The solver's ``eps_fn``: ε, or [ε | v] for learned-σ models (solvers split it, DDPM uses v)."""
        out = self.full_output(x, t)
        if self.v_schedule is None:
            return out
        t = as_time_vector(t, x.shape[0], x.device).to(torch.float64)
        view = (-1,) + (1,) * (x.ndim - 1)
        alpha = self.v_schedule.marginal_alpha(t).view(view).to(out)
        sigma = self.v_schedule.marginal_std(t).view(view).to(out)
        return v_to_eps(out, x, alpha, sigma)
