"""One DiMR branch: patchify (+ the lower branch's features handed on), long-skip stack, noise head.

Split from :mod:`zoo.backbones.dimr`, which assembles the branches (see its docstring).
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from zoo.blocks.skip_stack import LongSkipStack
from zoo.conditioning.base import Conditioning, conditioner_class, needs_embedding, norm_and_gate, without_gate
from zoo.conditioning.embeddings import LabelEmbedder, TimestepEmbedder, timestep_sinusoid
from zoo.conditioning.time_dependent import TimeDependentLayerNorm
from zoo.errors import UserError
from zoo.tracing import under_func_transform


def ddpm_step_from_log_snr(t: Tensor) -> Tensor:
    """DiMR's time input ``8n/N − 4`` back to the step on the 1000-step scale, 1000·n/N (n itself for the
    released N = 1000), which the scale embeddings expect."""
    return (t.float() + 4.0) * 125.0


def _flags(module: nn.Module) -> tuple[bool, bool]:
    """Whether any conditioner inside ``module`` needs an embedding / asks for a time token."""
    kinds = [type(m) for m in module.modules()]
    return (
        any(getattr(k, "needs_embedding", False) for k in kinds),
        any(getattr(k, "adds_time_token", False) for k in kinds),
    )


class FeatureUpsample(nn.Module):
    """Hands a branch's features on: norm(L) → Linear(L → C·r²) → sub-pixel shuffle → norm(C).

    The shuffle reads each token's ``C·r²`` outputs as ``(r1, r2, c)`` with ``c`` fastest
    (``b h w (r1 r2 c) -> b (h r1) (w r2) c``), DiMR's order, not ``nn.PixelShuffle``'s.
    """

    def __init__(self, in_dim: int, dim: int, ratio: int, norm: Callable[..., nn.Module]):
        super().__init__()
        self.ratio = ratio
        self.norm_in = norm(in_dim, cond_dim=dim)
        self.proj = nn.Linear(in_dim, dim * ratio * ratio)
        self.norm_out = norm(dim, cond_dim=dim)

    def forward(self, features: Tensor, cond: Conditioning) -> Tensor:
        h, _ = norm_and_gate(self.norm_in, features, cond)
        h = rearrange(self.proj(h), "b h w (r1 r2 c) -> b (h r1) (w r2) c", r1=self.ratio, r2=self.ratio)
        h, _ = norm_and_gate(self.norm_out, h, cond)
        return h


class DiMRBranch(nn.Module):
    """One resolution of DiMR: patchify (+ handed-on features), long-skip block stack, noise head.

    Feature maps stay channels-last ``(B, g, g, C)``; a branch whose blocks take token
    sequences (Transformer) flattens them and prepends its extra tokens (class, time).
    """

    def __init__(
        self,
        in_channels: int,
        input_size: int,
        num_classes: int,
        dim: int,
        depth: int,
        block: Callable[..., nn.Module],
        patch_size: int = 1,
        downsample: int = 1,
        head_kernel_size: int = 3,
        norm: Callable[..., nn.Module] = TimeDependentLayerNorm,
        handed_dim: int | None = None,
        upsample_ratio: int = 2,
        class_embedding: bool = False,
    ):
        super().__init__()
        self.downsample = downsample
        self.grid = input_size // downsample // patch_size
        self.spatial = bool(getattr(conditioner_class(block), "spatial_input", False))
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid, self.grid, dim))
        self.blocks = LongSkipStack(dim, depth, partial(block, dim, cond_dim=dim))
        self.handed_dim = dim * (len(self.blocks) + 1)  # stack input + every block output
        plain_norm = without_gate(norm, "model.norm")  # the hand-on and head norms read no gate: none allocated
        self.upsample = None if handed_dim is None else FeatureUpsample(handed_dim, dim, upsample_ratio, plain_norm)
        self.head_norm = plain_norm(dim, cond_dim=dim)
        self.head = nn.Conv2d(dim, in_channels, head_kernel_size, padding=head_kernel_size // 2)

        blocks_need_emb, time_token = _flags(self.blocks)
        if time_token and self.spatial:
            raise UserError(
                f"a time-token conditioner cannot serve {conditioner_class(block).__name__} (it takes 2-D "
                "maps, not a token sequence)", key_path="block.norm",  # DiMR prefixes its branch
                suggestion="use td_rmsnorm, td_layernorm or adaln_zero as its norm"
            )
        self.time_token = time_token
        self.class_embed = None
        if num_classes > 0 and not self.spatial:
            # weight set by DiMR.init_weights; skipping nn.Embedding's normal_ init keeps meta builds fast
            # (normal_ on the meta device imports torch._dynamo, seconds on a cold start)
            self.class_embed = nn.Embedding(num_classes, dim, _weight=torch.empty(num_classes, dim))
        self.num_extra_tokens = int(self.class_embed is not None) + int(time_token)
        self.needs_embedding = blocks_need_emb or needs_embedding(norm)
        if self.needs_embedding:
            self.t_embedder = TimestepEmbedder(dim)
            self.y_embedder = LabelEmbedder(num_classes, dim) if num_classes > 0 and class_embedding else None

    def embed(self, cond: Conditioning) -> Conditioning:
        """This branch's time (+ class) embedding, DiT-style (time as the DDPM step), when needed."""
        if not self.needs_embedding:
            return cond
        emb = self.t_embedder(ddpm_step_from_log_snr(cond.t))
        if self.y_embedder is not None and cond.y is not None:
            emb = emb + self.y_embedder(cond.y)
        return cond.with_embedding(emb)

    def extra_tokens(self, h: Tensor, cond: Conditioning) -> Tensor:
        """Prepend ``[class, time]`` tokens to ``(B, L, C)`` tokens (U-ViT's order)."""
        tokens = []
        if self.class_embed is not None:
            tokens.append(self.class_embed(cond.y)[:, None])
        if self.time_token:
            tokens.append(timestep_sinusoid(ddpm_step_from_log_snr(cond.t), h.shape[-1]).to(h.dtype)[:, None])
        return torch.cat([*tokens, h], dim=1) if tokens else h

    def forward(
        self, x: Tensor, cond: Conditioning, handed: Tensor | None, hand_on: bool
    ) -> tuple[Tensor, Tensor | None]:
        """``x`` full-resolution input ``(B, C_in, H, W)``; ``handed`` the previous branch's features.

        Returns this branch's noise prediction ``(B, C_in, g, g)`` and, if ``hand_on``, its own
        features ``(B, g, g, dim·(blocks+1))`` for the next branch.
        """
        cond = self.embed(cond)
        if self.downsample > 1:
            x = F.avg_pool2d(x, self.downsample)  # = area interpolation for an integer factor
        # channels_last input: the conv writes (B, g, g, C)-contiguous maps, the layout every later op wants
        x = x if under_func_transform() else x.contiguous(memory_format=torch.channels_last)  # (NYI under vmap)
        h = self.patch_embed(x).permute(0, 2, 3, 1) + self.pos_embed
        if self.upsample is not None:
            h = h + self.upsample(handed, cond)
        B, g, _, C = h.shape
        if not self.spatial:
            h = self.extra_tokens(h.reshape(B, g * g, C), cond)
        h, features = self.blocks(h, cond, return_features=hand_on)
        h = h[:, self.num_extra_tokens :].reshape(B, g, g, C) if not self.spatial else h
        h, _ = norm_and_gate(self.head_norm, h, cond)
        out = self.head(h.permute(0, 3, 1, 2)).contiguous()
        if not hand_on:
            return out, None
        if self.spatial:
            return out, torch.cat(features, dim=-1)
        # the extra tokens sliced off before the concatenation: it writes the (B, g, g, ·) map once, contiguous
        # (sliced after it, the next layer norm copied the whole map again)
        features = torch.cat([f[:, self.num_extra_tokens :] for f in features], dim=-1)
        return out, features.view(B, g, g, features.shape[-1])
