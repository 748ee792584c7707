"""adaLN-Zero (Peebles & Xie 2023, DiT): a LayerNorm whose shift/scale/gate come from the embedding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.domains import Eps, Width
from zoo.errors import UserError

from .base import Conditioning, check_conditioning, per_sample


class AdaLNZero(nn.Module):
    """``h = LN(x)·(1 + scale(c)) + shift(c)`` with ``[shift, scale, gate] = Linear(SiLU(c))``.

    LN has no affine parameters. The modulation Linear(cond_dim → 3·dim) is zero-initialised,
    so at init ``h = LN(x)`` and the gate is 0: every residual branch starts as the identity
    ("-Zero"). With ``gate=False`` the Linear gives only ``[shift, scale]`` (2·dim) and the
    returned gate is ``None`` (DiT's final layer). ``x`` is channels-last: ``(B, L, C)`` tokens
    or ``(B, H, W, C)`` maps; the embedding ``cond.emb`` is ``(B, cond_dim)``.

    DiT's per-block Linear(D → 6D) is this module twice (norm1 gets rows ``[:3D]``: shift_msa,
    scale_msa, gate_msa; norm2 the rest): the same parameters and FLOPs.
    """

    needs_embedding = True
    adds_time_token = False

    def __init__(self, dim: Width, cond_dim: Width | None = None, gate: bool = True, eps: Eps = 1e-6):
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.has_gate = gate
        self.act = nn.SiLU()
        self.linear = nn.Linear(cond_dim or dim, (3 if gate else 2) * dim)
        self.init_weights()

    def init_weights(self) -> None:
        """Zero the modulation (re-applied by backbones after their global init)."""
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: Tensor, cond: Conditioning) -> tuple[Tensor, Tensor | None]:
        check_conditioning(cond, "AdaLNZero's cond")
        emb = None if cond is None else cond.emb
        if emb is None or emb.shape[-1] != self.linear.in_features:
            got = "none (Conditioning.emb is None)" if emb is None else f"one of shape {tuple(emb.shape)}"
            raise UserError(f"AdaLNZero(dim={self.dim}) reads a (B, {self.linear.in_features}) time/class embedding "
                            f"from Conditioning.emb, got {got}",
                            suggestion="pass Conditioning(t=t, emb=emb) with emb of width cond_dim, or build it with "
                            "cond_dim = your embedding's width (zoo's backbones build one for conditioners that "
                            "set needs_embedding)")
        mod = self.linear(self.act(cond.emb))
        if self.has_gate:
            shift, scale, gate = mod.chunk(3, dim=-1)
        else:
            (shift, scale), gate = mod.chunk(2, dim=-1), None
        h = F.layer_norm(x, (self.dim,), eps=self.eps)
        return torch.addcmul(per_sample(shift, h), h, 1 + per_sample(scale, h)), gate  # one pass over h

    def extra_repr(self) -> str:
        return f"dim={self.dim}, gate={self.has_gate}, eps={self.eps}"
