"""How the trainer draws each sample's diffusion time: ``diffusion.time_sampling`` of a recipe.

* ``uniform`` (default; DDPM, iDDPM, DiT, U-ViT, DiMR): the 0-based DDPM index n uniform in
  0..N−1 (time t = (n+1)/N), or t uniform in [t_min, 1] for a continuous schedule.
* ``{type: logit_normal, mean: m, std: s}`` (Esser et al. 2024, SD3 §3.1): u = sigmoid(m + s·z)
  with z ~ N(0, 1), so training spends more samples at middle noise levels, where the image's
  layout is decided, and fewer at the two ends; a discrete schedule takes index ⌊u·N⌋.
  m = 0, s = 1 is SD3's choice; m > 0 moves the mass towards high noise.

The sampling changes which times the loss sees, not how each is weighted (``min_snr_gamma`` still
applies per sample), so a run's printed losses are not comparable across samplings; the
validation loss (``train.val_every``) draws its times stratified-uniform whatever this says.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor

from .time_input import index_to_time

#: Each sampling's keys besides ``type``, with their defaults.
TIME_SAMPLINGS: dict[str, dict[str, float]] = {
    "uniform": {},
    "logit_normal": {"mean": 0.0, "std": 1.0},
}


@dataclass(frozen=True)
class TimeSampling:
    """A training-time distribution over [t_min, 1] (continuous) or the knots (n+1)/N (discrete)."""

    type: str = "uniform"
    mean: float = 0.0
    std: float = 1.0

    def __post_init__(self) -> None:
        if self.type not in TIME_SAMPLINGS:
            raise ValueError(f"unknown time sampling {self.type!r}; known: {', '.join(TIME_SAMPLINGS)}")
        if not self.std > 0:
            raise ValueError(f"the logit-normal std must be > 0, got {self.std!r}")

    @classmethod
    def from_spec(cls, spec: str | Mapping[str, Any] | None) -> "TimeSampling":
        """``uniform``, ``{type: logit_normal, mean: 0, std: 1}`` or None (uniform)."""
        if not spec or isinstance(spec, str):
            return cls(spec or "uniform")
        return cls(**{k: (v if k == "type" else float(v)) for k, v in spec.items()})

    def draw(self, shape: tuple[int, ...], num_steps: int, continuous: bool, t_min: float = 0.0,
             generator: torch.Generator | None = None, device: torch.device | str | None = None) -> Tensor:
        """Times t (float64) of ``shape``: one draw from ``generator`` per time (a randint or rand for
        ``uniform``, exactly what the trainer always drew; a randn for ``logit_normal``)."""
        return self.to_time(self.draw_raw(shape, num_steps, continuous, generator, device), num_steps, continuous,
                            t_min)

    def draw_raw(self, shape: tuple[int, ...], num_steps: int, continuous: bool,
                 generator: torch.Generator | None = None, device: torch.device | str | None = None) -> Tensor:
        """The random part of :meth:`draw`: the DDPM index (int64) for a discrete ``uniform``, else u in [0, 1]
        (float64). Draws made one at a time (a generator per sample) are stacked and mapped by :meth:`to_time` at
        once, which gives the same bits: what it does is exact elementwise arithmetic."""
        if self.type == "uniform" and not continuous:
            return torch.randint(0, num_steps, shape, generator=generator, device=device)
        if self.type == "uniform":
            return torch.rand(shape, generator=generator, dtype=torch.float64, device=device)
        return torch.sigmoid(self.mean + self.std * torch.randn(shape, generator=generator, dtype=torch.float64,
                                                                device=device))

    def to_time(self, raw: Tensor, num_steps: int, continuous: bool, t_min: float = 0.0) -> Tensor:
        """Times t (float64) of :meth:`draw_raw`'s values: in [t_min, 1], or the knot of a DDPM index."""
        if continuous:
            return t_min + (1.0 - t_min) * raw
        if self.type != "uniform":
            raw = (raw * num_steps).floor().long().clamp_(0, num_steps - 1)
        return index_to_time(raw, num_steps)


UNIFORM = TimeSampling()
