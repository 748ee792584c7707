"""Label dropping for classifier-free guidance training (Ho & Salimans 2022, §3.2)."""

from __future__ import annotations

import torch
from torch import Tensor


def drop_labels(
    y: Tensor, prob: float, null_label: int, generator: torch.Generator | None = None
) -> Tensor:
    """Replace each label by ``null_label`` independently with probability ``prob`` (vectorised).

    Returns a new tensor; ``y`` is left untouched. ``prob = 0`` returns ``y`` itself.
    """
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"label drop probability must be in [0, 1], got {prob}")
    if prob == 0.0:
        return y
    u = torch.rand(y.shape, generator=generator, device=generator.device if generator else y.device)
    return torch.where(u.to(y.device) < prob, torch.full_like(y, null_label), y)
