"""Parts every patch-based backbone shares: patch embedding, unpatchify, sin-cos position tables, init."""

from __future__ import annotations

from typing import Annotated, Callable

import torch
from torch import Tensor, nn

from zoo.conditioning.base import conditioner_class
from zoo.domains import Doc, OneOf
from zoo.errors import UserError
from zoo.tracing import under_func_transform


class PatchEmbed(nn.Module):  # = timm.layers.PatchEmbed(img_size=None); importing timm adds 2.5-4 s (blocks/mlp.py)
    """Non-overlapping patches as tokens: ``Conv2d(k = s = p)``, ``(B, C, H, W) -> (B, H/p · W/p, D)``."""

    def __init__(self, in_channels: int, dim: int, patch_size: int, bias: bool = True):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        # one copy here, token-major: the transposed view would pass its strides on to every residual sum
        # after it, and each LayerNorm would copy its input to make it contiguous (DiT-S/2: 50 copies a step)
        return self.proj(x).flatten(2).transpose(1, 2).contiguous()


def check_inputs(model: str, x: Tensor, y: Tensor | None, channels: int, size: int, num_labels: int,
                 weight: Tensor | None = None) -> None:
    """Refuse inputs a backbone cannot take, in one line naming what it takes, before they reach a layer.

    ``x`` must be ``(B, channels, size, size)`` floating point, of ``weight``'s dtype (the first layer's)
    unless autocast is on, and ``y`` ``None`` or ``B`` int64/int32 labels (what ``nn.Embedding`` indexes
    with) in ``0 .. num_labels − 1`` (an unconditional model, ``num_labels == 0``, takes none). Label
    values are checked on the CPU only: on an accelerator that read would wait for the device every
    call, and under ``torch.compile`` it would break the graph.
    """
    if not isinstance(x, Tensor) or x.ndim != 4 or tuple(x.shape[1:]) != (channels, size, size):
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise UserError(f"{model} takes x of shape (B, {channels}, {size}, {size}), got {got}")
    if not x.dtype.is_floating_point:
        raise UserError(f"{model} takes x as floating point (images or latents scaled to about [-1, 1]), got {x.dtype}",
                        suggestion="convert it, e.g. x.float() / 127.5 - 1 for uint8 pixels")
    if (weight is not None and type(weight) is nn.Parameter and x.dtype != weight.dtype
            and not torch.is_autocast_enabled(x.device.type)):
        raise UserError(f"{model} has {weight.dtype} weights but x is {x.dtype}",
                        suggestion=f"pass x.to({weight.dtype}), convert the model, or run under torch.autocast")
    if y is None:
        return
    if num_labels == 0:
        raise UserError(f"this {model} is unconditional (no label table): it cannot take labels y",
                        suggestion="call it without y, or build it with num_classes")
    if not isinstance(y, Tensor) or y.dtype not in (torch.int64, torch.int32) or tuple(y.shape) != (x.shape[0],):
        got = f"{y.dtype} of shape {tuple(y.shape)}" if isinstance(y, Tensor) else type(y).__name__
        hint = "y.long()" if isinstance(y, Tensor) and tuple(y.shape) == (x.shape[0],) else None
        raise UserError(f"{model} takes y as {x.shape[0]} integer labels (int64 or int32, shape ({x.shape[0]},)), "
                        f"got {got}", suggestion=hint and f"pass {hint}")
    if y.device.type == "cpu" and y.numel() and not torch.compiler.is_compiling() and not under_func_transform():
        low, high = int(y.min()), int(y.max())
        if low < 0 or high >= num_labels:
            raise UserError(f"label {low if low < 0 else high} is out of range: this {model} embeds labels "
                            f"0..{num_labels - 1} (a null label for guidance among them, where it has one)")


def refuse_block_settings(block: Callable[..., nn.Module], passed: tuple[str, ...], model: str) -> None:
    """A block recipe that sets what the backbone passes to every block: say where it goes instead.

    ``cond_dim`` is the backbone's own width (nothing to set anywhere); the rest are the backbone's
    arguments. The recipe check only says the parent passes them, not where they belong.
    """
    cls = conditioner_class(block)
    if getattr(cls, "spatial_input", False):  # e.g. ConvNeXt: takes (B, H, W, C) maps
        raise UserError(f"block {getattr(cls, '__name__', cls)} takes 2-D maps (spatial_input = True) and the {model} "
                        "passes token sequences (B, L, C)", key_path="model.block",
                        suggestion="use a token block (transformer) here, or the map block in a DiMR branch")
    bound = sorted(set(getattr(block, "keywords", {})) & set(passed))
    if "cond_dim" in bound:
        raise UserError(f"cond_dim is set by the {model} (its width) for every block; the recipe may not set it",
                        key_path="model.block.cond_dim", suggestion="remove cond_dim from the block")
    if bound:
        raise UserError(f"set {', '.join(bound)} on the {model}, not on its block: the {model} passes "
                        f"{'it' if len(bound) == 1 else 'them'} to every block", key_path=f"model.block.{bound[0]}",
                        suggestion=f"move {bound[0]} up one level, beside block:")


def unpatchify(x: Tensor, patch_size: int, channels: int, grid: tuple[int, int]) -> Tensor:
    """Tokens ``(B, h·w, p·p·C)`` back to an image ``(B, C, h·p, w·p)``.

    Each token's features are laid out ``(p1, p2, c)`` with ``c`` fastest (DiT, U-ViT).
    """
    h, w = grid
    p = patch_size
    x = x.reshape(x.shape[0], h, w, p, p, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(x.shape[0], channels, h * p, w * p)


def sincos_pos_embed_1d(dim: int, positions: Tensor) -> Tensor:
    """``[sin(pos ω) | cos(pos ω)]`` with ``ω_k = 10000^(-k / (dim/2))``, ``(N,) -> (N, dim)``, in float64."""
    if dim % 2:
        raise ValueError(f"sin-cos position width must be even, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64, device=positions.device) / (dim / 2))
    angles = positions.to(torch.float64).reshape(-1)[:, None] * omega[None]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_pos_embed_2d(
    dim: int, grid_size: int | tuple[int, int], dtype: torch.dtype = torch.float32, device: torch.device | None = None
) -> Tensor:
    """Fixed 2-D sin-cos position table (MAE, He et al. 2022; DiT), ``(h·w, dim)``, rows in raster order.

    The first ``dim/2`` channels encode the column index, the last ``dim/2`` the row index;
    each half is :func:`sincos_pos_embed_1d` (``ω_k = 10000^(-k/(dim/4))``). Computed in float64
    and cast to ``dtype``.
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos position width must be divisible by 4, got {dim}")
    h, w = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    rows = torch.arange(h, dtype=torch.float64, device=device).repeat_interleave(w)
    cols = torch.arange(w, dtype=torch.float64, device=device).repeat(h)
    table = torch.cat([sincos_pos_embed_1d(dim // 2, cols), sincos_pos_embed_1d(dim // 2, rows)], dim=1)
    return table.to(dtype)


def xavier_init_linears_(module: nn.Module) -> None:
    """Xavier-uniform every ``nn.Linear`` weight and zero its bias, then let sub-modules with an
    ``init_weights()`` hook (e.g. adaLN-Zero's zero-init) restore their own initialisation."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    for m in module.modules():
        if m is not module and callable(getattr(m, "init_weights", None)):
            m.init_weights()


POS_EMBED_INITS = ("normal", "sincos")

#: How a learned position table starts (``pos_embed_init`` of U-ViT and DiMR).
PosEmbedInit = Annotated[str, OneOf(POS_EMBED_INITS, "pos_embed_init"), Doc(
    "normal: trunc-normal std 0.02 (released U-ViT/DiMR); sincos: starts from the 2-D sin-cos table, still learned")]


def init_pos_embed_(table: Tensor, grid: int, how: str = "normal", extra_tokens: int = 0) -> None:
    """Initialise a learned position table in place: trunc-normal(0.02) everywhere (the released
    U-ViT/DiMR init), then for ``how="sincos"`` the ``grid x grid`` patch positions (after
    ``extra_tokens`` rows such as U-ViT's time and label tokens) start from the 2-D sin-cos table.

    ``table`` is ``(1, extra_tokens + grid**2, dim)`` or ``(1, grid, grid, dim)``.
    """
    if how not in POS_EMBED_INITS:
        raise UserError(f"pos_embed_init must be one of {', '.join(POS_EMBED_INITS)}, got {how!r}")
    nn.init.trunc_normal_(table, std=0.02)
    if how == "sincos":
        dim = table.shape[-1]
        if dim % 4:
            raise UserError(f"pos_embed_init: sincos needs a width divisible by 4, got {dim}",
                            key_path="model.pos_embed_init", suggestion="use normal, or a width divisible by 4")
        with torch.no_grad():
            table.view(-1, dim)[extra_tokens:].copy_(sincos_pos_embed_2d(dim, grid, dtype=table.dtype, device=table.device))
