"""DiMR's multi-scale ε targets and loss (paper §4.3, eq. 8; as released).

Branch i predicts the noise at its own resolution. Its target is ε pooled by the factor
r = H / H_i: summed over each r×r block and divided by r, i.e. average-pooled and multiplied
by r, so each target element is again unit-variance noise (a plain average would shrink it by
r). The loss per sample is Σ_i coeff_i · mean((out_i − target_i)²); the released coefficients
are [1/4, 1] for two branches and the paper's Table 4 gives [1/16, 1/4, 1] for three
(lowest resolution first).
"""

from __future__ import annotations

from typing import Sequence

import torch.nn.functional as F
from torch import Tensor


def multiscale_target(eps: Tensor, size: int | tuple[int, int]) -> Tensor:
    """``eps`` ``(B, C, H, W)`` pooled to ``size``: r×r block sums divided by r (variance kept at 1)."""
    h, w = (size, size) if isinstance(size, int) else size
    H, W = eps.shape[-2:]
    if H % h or W % w or H // h != W // w:
        raise ValueError(f"cannot pool a {H}x{W} noise map to {h}x{w}: need one integer factor for both sides")
    r = H // h
    return eps if r == 1 else F.avg_pool2d(eps, r) * r


def multiscale_targets(eps: Tensor, outputs: Sequence[Tensor]) -> list[Tensor]:
    """The target of every branch output (same order as ``outputs``, lowest resolution first)."""
    return [multiscale_target(eps, tuple(o.shape[-2:])) for o in outputs]


def multiscale_loss(outputs: Sequence[Tensor], eps: Tensor, coeffs: Sequence[float]) -> Tensor:
    """Per-sample loss ``Σ_i coeff_i · mean((out_i − target_i)²)``, shape ``(B,)``."""
    if len(outputs) != len(coeffs):
        raise ValueError(f"{len(outputs)} branch outputs but {len(coeffs)} loss coefficients")
    terms = [
        coeff * (out - target).pow(2).flatten(1).mean(dim=1)
        for out, target, coeff in zip(outputs, multiscale_targets(eps, outputs), coeffs)
    ]
    return sum(terms[1:], terms[0])
