"""A third-party plugin as the tests install it: one block and one tiny backbone.

It registers through entry points only (``zoo_fake_plugin-0.1.dist-info/entry_points.txt``),
the way any package adds components to zoo.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from zoo.conditioning.base import Conditioning
from zoo.conditioning.layernorm import LayerNorm


class ScaleBlock(nn.Module):
    """Residual block adding a learned per-channel scale of its normed input."""

    def __init__(self, dim: int, num_heads: int = 1, cond_dim: int | None = None,
                 norm: Callable[..., nn.Module] = LayerNorm, init: float = 1.0):
        super().__init__()
        self.norm = norm(dim, cond_dim=cond_dim)
        self.scale = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x: Tensor, cond: Conditioning) -> Tensor:
        h, _ = self.norm(x, cond)
        return x + h * self.scale


class TinyNet(nn.Module):
    """Tiny token backbone: Linear in, ``depth`` blocks, Linear out, on ``(B, tokens, in_features)``."""

    def __init__(self, in_features: int, dim: int, depth: int, block: Callable[..., nn.Module],
                 num_heads: int = 2, tokens: int = 4, bias: bool | None = None):
        super().__init__()
        self.in_features, self.tokens = in_features, tokens
        self.proj_in = nn.Linear(in_features, dim, bias=bias is not False)
        self.blocks = nn.ModuleList(block(dim, num_heads=num_heads, cond_dim=None) for _ in range(depth))
        self.proj_out = nn.Linear(dim, in_features)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        cond = Conditioning(t=t, y=y)
        h = self.proj_in(x)
        for blk in self.blocks:
            h = blk(h, cond)
        return self.proj_out(h)

    def example_inputs(self, batch_size: int = 1) -> tuple:
        p = self.proj_out.weight
        x = torch.zeros(batch_size, self.tokens, self.in_features, device=p.device, dtype=p.dtype)
        return x, torch.zeros(batch_size, device=p.device), None
