"""An example zoo plugin: the parallel Transformer block (GPT-J; Dehghani et al. 2023, ViT-22B).

``x + gate1·Attn(norm1(x, c)) + gate2·MLP(norm2(x, c))``: attention and MLP read the same
input, so their two input projections can run as one GEMM. It takes the arguments zoo's own
Transformer block takes (``dim``, ``num_heads``, ``cond_dim`` from the backbone; ``norm`` and
``mlp`` factories from the recipe), so any backbone that builds Transformer blocks builds it.
The package registers it with one entry point (see ``pyproject.toml``); zoo imports this module
only when a recipe names ``parallel_transformer``.
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor, nn

from zoo.blocks.attention import Attention
from zoo.blocks.mlp import Mlp, mlp_width
from zoo.conditioning.base import Conditioning, apply_gate, norm_and_gate
from zoo.conditioning.layernorm import LayerNorm


class ParallelTransformerBlock(nn.Module):
    """``x + gate1·Attn(norm1(x, c)) + gate2·MLP(norm2(x, c))`` on ``(B, L, C)`` tokens (parallel form)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 norm: Callable[..., nn.Module] = LayerNorm, mlp: Callable[..., nn.Module] = Mlp,
                 cond_dim: int | None = None):
        super().__init__()
        self.norm1 = norm(dim, cond_dim=cond_dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias)
        self.norm2 = norm(dim, cond_dim=cond_dim)
        self.mlp = mlp(dim, hidden_features=mlp_width(dim, mlp_ratio))

    def forward(self, x: Tensor, cond: Conditioning) -> Tensor:
        h1, gate1 = norm_and_gate(self.norm1, x, cond)   # = self.norm1(x, cond), checked to be (h, gate)
        h2, gate2 = norm_and_gate(self.norm2, x, cond)
        return x + apply_gate(self.attn(h1), gate1) + apply_gate(self.mlp(h2), gate2)
