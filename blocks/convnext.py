"""The ConvNeXt block (Liu et al. 2022) on channels-last feature maps, conditioned through its norm."""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.conditioning.base import Conditioning, add_gated, norm_and_gate
from zoo.conditioning.layernorm import LayerNorm
from zoo.domains import ConditionerFactory, MlpFactory, OneOf, Range, Ratio, Rule, Width
from zoo.tracing import under_func_transform

from .mlp import Mlp, mlp_width

VARIANTS = ("dimr", "standard")


class ConvNeXtBlock(nn.Module):
    """A depthwise k×k convolution and a pointwise MLP on ``(B, H, W, C)`` maps.

    Two arrangements of the same parts:

    * ``variant="dimr"`` (DiMR's released block): ``x += DWConv(x)`` with no norm before it,
      then ``x += gate·ls·MLP(norm(x, c))`` — two residuals; with ``normed_conv`` the conv branch
      gets its own conditioner too, ``x += gate·DWConv(norm(x, c))`` (DiT's block with the
      attention replaced: how adaLN-Zero gives a ConvNeXt block 6C modulation rows, paper Table 2 row 3);
    * ``variant="standard"`` (ConvNeXt): ``x += gate·ls·MLP(norm(DWConv(x), c))`` — one residual.

    ``norm`` is any conditioner factory (TD-RMSNorm in DiMR, LayerNorm in ConvNeXt, adaLN-Zero
    returns a gate); ``mlp`` an MLP factory called with ``hidden_features = mlp_ratio·dim``
    (GeGLU with ratio 2 in DiMR, GELU MLP with ratio 4 in ConvNeXt). ``ls`` is the learned
    per-channel layer scale when ``layer_scale_init`` is set (ConvNeXt uses 1e-6; DiMR none).
    The depthwise convolution runs on a channels-last NCHW view, so no copies are made.
    """

    spatial_input = True  # takes (B, H, W, C) maps, not token sequences

    constraints = (
        Rule("kernel_size odd (keeps the map size)", lambda kernel_size: kernel_size % 2 == 1, ("kernel_size",)),
        Rule("normed_conv only with variant dimr (the standard block already norms after the conv)",
             lambda normed_conv, variant: not normed_conv or variant == "dimr", ("normed_conv", "variant")),
    )

    def __init__(
        self,
        dim: Width,
        cond_dim: Width | None = None,
        kernel_size: Annotated[int, Range(1, 31)] = 7,
        mlp_ratio: Ratio = 4.0,
        norm: ConditionerFactory = LayerNorm,
        mlp: MlpFactory = Mlp,
        variant: Annotated[str, OneOf(VARIANTS, "variant")] = "dimr",
        layer_scale_init: float | None = None,
        normed_conv: bool = False,
    ):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown ConvNeXt variant {variant!r}; choose one of {VARIANTS}")
        if kernel_size % 2 == 0:
            raise ValueError(f"ConvNeXt kernel_size must be odd (got {kernel_size}) to keep the map size")
        if normed_conv and variant != "dimr":
            raise ValueError("normed_conv applies to the 'dimr' variant (the standard block already norms after the conv)")
        self.variant = variant
        self.conv_norm = norm(dim, cond_dim=cond_dim) if normed_conv else None
        self.dwconv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.norm = norm(dim, cond_dim=cond_dim)
        self.mlp = mlp(dim, hidden_features=mlp_width(dim, mlp_ratio))
        self.layer_scale = None if layer_scale_init is None else nn.Parameter(torch.full((dim,), layer_scale_init))

    def depthwise(self, x: Tensor) -> Tensor:
        """The k×k depthwise conv of a ``(B, H, W, C)`` map, returned in the same layout."""
        y = x.permute(0, 3, 1, 2)  # NCHW view with channels_last strides: no copy
        if not under_func_transform() and not y.is_contiguous(memory_format=torch.channels_last):  # (NYI under vmap)
            y = y.contiguous(memory_format=torch.channels_last)
        y = F.conv2d(y, self.dwconv.weight, self.dwconv.bias, padding=self.dwconv.padding, groups=self.dwconv.groups)
        return y.permute(0, 2, 3, 1)

    def forward(self, x: Tensor, cond: Conditioning) -> Tensor:
        if self.variant == "dimr":
            if self.conv_norm is None:
                x = x + self.depthwise(x)
            else:
                h, gate = norm_and_gate(self.conv_norm, x, cond)
                x = add_gated(x, self.depthwise(h), gate)
            h, gate = norm_and_gate(self.norm, x, cond)
        else:
            h, gate = norm_and_gate(self.norm, self.depthwise(x), cond)
        h = self.mlp(h)
        if self.layer_scale is not None:
            h = h * self.layer_scale
        return add_gated(x, h, gate)

    def extra_repr(self) -> str:
        return f"variant={self.variant!r}"
