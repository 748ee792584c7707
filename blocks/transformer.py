"""The pre-norm Transformer block, conditioned through whatever norm it is given."""

from __future__ import annotations

from torch import Tensor, nn

from zoo.conditioning.base import Conditioning, add_gated, norm_and_gate
from zoo.conditioning.layernorm import LayerNorm
from zoo.domains import ConditionerFactory, Divisible, Heads, MlpFactory, Ratio, Width

from .attention import Attention
from .mlp import Mlp, mlp_width


class TransformerBlock(nn.Module):
    """``x += gate1 * Attn(norm1(x, c)); x += gate2 * MLP(norm2(x, c))`` on ``(B, L, C)`` tokens.

    ``norm`` is a conditioner factory (plain LayerNorm for U-ViT, adaLN-Zero for DiT,
    TD-RMSNorm for DiMR); its gate is ``None`` except for adaLN-Zero, so the same block is
    DiT's, U-ViT's and DiMR's Transformer block. ``mlp`` is an MLP factory called with
    ``hidden_features = mlp_ratio * dim``.
    """

    constraints = (Divisible("dim", "num_heads"),)

    def __init__(
        self,
        dim: Width,
        num_heads: Heads,
        mlp_ratio: Ratio = 4.0,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        norm: ConditionerFactory = LayerNorm,
        mlp: MlpFactory = Mlp,
        cond_dim: Width | None = None,
    ):
        super().__init__()
        self.norm1 = norm(dim, cond_dim=cond_dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias)
        self.norm2 = norm(dim, cond_dim=cond_dim)
        self.mlp = mlp(dim, hidden_features=mlp_width(dim, mlp_ratio))

    def forward(self, x: Tensor, cond: Conditioning) -> Tensor:
        h, gate = norm_and_gate(self.norm1, x, cond)
        x = add_gated(x, self.attn(h), gate)
        h, gate = norm_and_gate(self.norm2, x, cond)
        return add_gated(x, self.mlp(h), gate)
