"""Unconditioned norms: the conditioners of blocks whose time enters elsewhere (or nowhere)."""

from __future__ import annotations

from torch import Tensor, nn

from zoo.domains import Eps, Width

from .base import Conditioning


class LayerNorm(nn.LayerNorm):
    """LayerNorm over the last dim that ignores the conditioning (U-ViT's pre-norm)."""

    needs_embedding = False
    adds_time_token = False
    ignores_time = True  # neither t nor an embedding reaches it

    def __init__(self, dim: Width, cond_dim: Width | None = None, eps: Eps = 1e-5, affine: bool = True):
        super().__init__(dim, eps=eps, elementwise_affine=affine)

    def forward(self, x: Tensor, cond: Conditioning | None = None) -> tuple[Tensor, None]:  # type: ignore[override]
        return super().forward(x), None


class RMSNorm(nn.RMSNorm):
    """RMSNorm over the last dim (scale only) that ignores the conditioning."""

    needs_embedding = False
    adds_time_token = False
    ignores_time = True  # neither t nor an embedding reaches it

    def __init__(self, dim: Width, cond_dim: Width | None = None, eps: Eps = 1e-6, affine: bool = True):
        super().__init__(dim, eps=eps, elementwise_affine=affine)

    def forward(self, x: Tensor, cond: Conditioning | None = None) -> tuple[Tensor, None]:  # type: ignore[override]
        return super().forward(x), None
