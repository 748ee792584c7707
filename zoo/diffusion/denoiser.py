"""The backbone as the diffusion process sees it: one call shared by the trainer and the sampler.

``Denoiser(model, time_map, null_label)(x, t, y, drop)`` maps continuous diffusion time ``t``
to the backbone's own time input (in float64: a float64 ``t`` maps to exact integer DDPM steps; a
float32 one carries its rounding, ~3e-5 of a step at 1000 steps), replaces the
labels marked in ``drop`` by the null label (classifier-free guidance: label dropout in
training, the unconditional half of a guided batch in sampling) and calls ``model(x, t_in, y)``.
The objectives (:mod:`~zoo.diffusion.objectives`) and guidance (:mod:`~zoo.diffusion.guidance`)
both call the backbone only through it, so training and sampling cannot disagree on time or labels.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from zoo.conditioning.base import as_time_vector


class Denoiser:
    """``model(x, time_map(t), y with dropped labels → null_label)``; returns the raw backbone output."""

    def __init__(self, model: nn.Module | Callable, time_map: Callable[[Tensor], Tensor],
                 null_label: int | None = None) -> None:
        self.model, self.time_map, self.null_label = model, time_map, null_label

    def labels(self, y: Tensor | None, drop: Tensor | None) -> Tensor | None:
        """``y`` with the entries where ``drop`` is true replaced by the null label."""
        if y is None or drop is None:
            return y
        if self.null_label is None:
            raise ValueError("dropping labels needs the null label (diffusion.null_label)")
        return torch.where(drop.to(y.device), torch.full_like(y, self.null_label), y)

    def time_input(self, t: Tensor, batch: int, device: torch.device) -> Tensor:
        """The backbone's time input for continuous time ``t`` (scalar or (B,)), mapped in float64 and
        returned in ``t``'s precision, at least float32 (backbones cast it to their own dtype)."""
        t = as_time_vector(t, batch, device)
        dtype = torch.promote_types(t.dtype, torch.float32) if t.is_floating_point() else torch.float32
        return self.time_map(t.to(torch.float64)).to(dtype)

    def __call__(self, x: Tensor, t: Tensor, y: Tensor | None = None, drop: Tensor | None = None):
        return self.model(x, self.time_input(t, x.shape[0], x.device), self.labels(y, drop))
