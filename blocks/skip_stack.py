"""U-ViT's long-skip block stack, shared by U-ViT and every DiMR branch."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from zoo.conditioning.base import Conditioning


class LongSkipStack(nn.Module):
    """``depth // 2`` in-blocks, one mid-block, ``depth // 2`` out-blocks with long skips.

    Before each out-block, ``x = skip_linears[i](cat[x, skips.pop()])`` (last in, first out),
    as U-ViT (Bao et al. 2023) does; ``depth`` builds ``2 * (depth // 2) + 1`` blocks.
    ``block`` is a factory called with no arguments (the parent binds width and conditioning
    width). Blocks see tensors with channels last, so the stack serves tokens ``(B, L, C)``
    and feature maps ``(B, H, W, C)`` alike. Set ``grad_checkpointing`` to recompute each
    block's activations in the backward pass instead of storing them. ``long_skips=False``
    chains the blocks plainly (the official U-ViT's ``skip=False`` ablation): no skip linears.
    """

    grad_checkpointing: bool = False

    def __init__(self, dim: int, depth: int, block: Callable[[], nn.Module], long_skips: bool = True):
        super().__init__()
        half = depth // 2
        self.in_blocks = nn.ModuleList(block() for _ in range(half))
        self.mid_block = block()
        self.skip_linears = nn.ModuleList(nn.Linear(2 * dim, dim) for _ in range(half if long_skips else 0))
        self.out_blocks = nn.ModuleList(block() for _ in range(half))

    def __len__(self) -> int:
        return 2 * len(self.in_blocks) + 1

    def _block(self, blk: nn.Module, x: Tensor, cond: Conditioning) -> Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(blk, x, cond, use_reentrant=False)
        return blk(x, cond)

    def forward(self, x: Tensor, cond: Conditioning, return_features: bool = False) -> tuple[Tensor, list[Tensor]]:
        """Run the stack; with ``return_features`` also return ``[input, every block output]``."""
        features = [x] if return_features else []
        skips = []
        for blk in self.in_blocks:
            x = self._block(blk, x, cond)
            skips.append(x)
            if return_features:
                features.append(x)
        x = self._block(self.mid_block, x, cond)
        if return_features:
            features.append(x)
        for i, blk in enumerate(self.out_blocks):
            if self.skip_linears:
                x = self.skip_linears[i](torch.cat([x, skips.pop()], dim=-1))
            x = self._block(blk, x, cond)
            if return_features:
                features.append(x)
        return x, features
