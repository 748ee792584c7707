"""DiT (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers"), built from shared parts.

Patch tokens + fixed sin-cos positions, ``depth`` Transformer blocks conditioned through their
norms (adaLN-Zero by default) on ``c = t_emb + y_emb``, an adaLN-modulated linear head, and
unpatchify. The constructor keeps the official argument names so an official config maps 1:1.
"""

from __future__ import annotations

from functools import partial
from typing import Annotated, Callable

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from zoo.blocks.mlp import Mlp
from zoo.blocks.transformer import TransformerBlock
from zoo.conditioning.adaln_zero import AdaLNZero
from zoo.conditioning.base import Conditioning, adds_time_token, as_time_vector, bind_unset, norm_and_gate
from zoo.conditioning.embeddings import LabelEmbedder, TimestepEmbedder
from zoo.conditioning.time_dependent import STEP_TIME_SCALE
from zoo.domains import (Calls, Channels, Classes, ConditionerFactory, Depth, Divisible, FrequencyWidth, Heads, ImageSize,
                         MlpFactory, PatchSize, Range, Ratio, Rule, Width)
from zoo.errors import UserError

from .common import (PatchEmbed, check_inputs, refuse_block_settings, sincos_pos_embed_2d, unpatchify,
                     xavier_init_linears_)

# Arguments DiT passes to every block; a block factory must leave them to DiT.
_BLOCK_ARGS = ("num_heads", "mlp_ratio", "norm", "mlp", "cond_dim")


class FinalLayer(nn.Module):
    """DiT's head: LN (no affine) modulated by ``(shift, scale)`` of the embedding, then Linear(D → p²·C_out)."""

    def __init__(self, dim: int, out_features: int):
        super().__init__()
        self.norm = AdaLNZero(dim, cond_dim=dim, gate=False)
        self.linear = nn.Linear(dim, out_features)

    def init_weights(self) -> None:
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: Tensor, cond: Conditioning) -> Tensor:
        h, _ = norm_and_gate(self.norm, x, cond)
        return self.linear(h)


class DiT(nn.Module):
    """Diffusion Transformer on latents ``(B, in_channels, input_size, input_size)``.

    ``forward(x, t, y)`` takes ``t`` as the integer DDPM index 0..999 (the official input) and
    class labels ``y`` (``num_classes`` is the null label when ``class_dropout_prob > 0``;
    ``y=None`` means unconditional, which needs that null label). It returns ``(B, 2C, H, W) = [eps | v]`` when
    ``learn_sigma`` else ``(B, C, H, W)``.

    ``block`` is a block factory called as ``block(hidden_size, num_heads=, mlp_ratio=, norm=,
    mlp=, cond_dim=)``; ``norm`` the conditioner factory of every block (adaLN-Zero in DiT; any
    conditioner works, e.g. TD-LN, whose ``time_scale`` defaults to ``STEP_TIME_SCALE`` here). The
    time/class embedding is always built: the head's adaLN uses it even when the blocks' conditioner
    does not.
    """

    grad_checkpointing: bool = False
    #: the ``diffusion.time_input`` values this backbone reads as it was built to (a DDPM step, 0..1000)
    time_inputs = ("dit_index", "uvit_discrete", "uvit_continuous")

    constraints = (
        Divisible("input_size", "patch_size"),
        Divisible("hidden_size", "num_heads"),
        Rule("hidden_size divisible by 4 (the 2-D sin-cos position table)", lambda hidden_size: hidden_size % 4 == 0,
             ("hidden_size",)),
    )

    def __init__(
        self,
        input_size: ImageSize = 32,
        patch_size: PatchSize = 2,
        in_channels: Channels = 4,
        hidden_size: Width = 1152,
        depth: Depth = 28,
        num_heads: Heads = 16,
        mlp_ratio: Ratio = 4.0,
        class_dropout_prob: Annotated[float, Range(0, 1, hi_open=True)] = 0.1,
        num_classes: Classes = 1000,
        learn_sigma: bool = True,
        block: Annotated[Callable[..., nn.Module], Calls(1, _BLOCK_ARGS)] = TransformerBlock,
        norm: ConditionerFactory = AdaLNZero,
        mlp: MlpFactory = partial(Mlp, act="gelu_tanh"),
        frequency_dim: FrequencyWidth = 256,
    ):
        super().__init__()
        if input_size % patch_size:
            raise UserError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        if adds_time_token(norm):
            raise UserError("DiT conditions through its norms; a time-token conditioner belongs in U-ViT",
                            key_path="model.norm", suggestion="use adaln_zero (DiT's own), td_layernorm or td_rmsnorm")
        refuse_block_settings(block, _BLOCK_ARGS, "DiT")
        norm = bind_unset(norm, "time_scale", STEP_TIME_SCALE)  # TD norms: t is the DDPM step, not DiMR's log-SNR
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.input_size = input_size
        self.patch_size = patch_size
        self.num_classes = num_classes
        self.num_labels = num_classes + int(class_dropout_prob > 0)  # rows of the label table: the null label is the last
        self.null_row = num_classes if class_dropout_prob > 0 else None  # a row of its own, beside the classes
        self.learn_sigma = learn_sigma
        self.grid = input_size // patch_size

        self.x_embedder = PatchEmbed(in_channels, hidden_size, patch_size)
        self.t_embedder = TimestepEmbedder(hidden_size, frequency_dim)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        # Fixed sin-cos table, a frozen parameter as in the official model (counted by parameters()).
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid**2, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList(
            block(hidden_size, num_heads=num_heads, mlp_ratio=mlp_ratio, norm=norm, mlp=mlp, cond_dim=hidden_size)
            for _ in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, patch_size**2 * self.out_channels)
        self.init_weights()

    def init_weights(self) -> None:
        """DiT's init: xavier Linears (zero bias), patch conv as a Linear, N(0, 0.02) embeddings,
        zero adaLN and head (so a fresh DiT outputs exactly 0)."""
        with torch.no_grad():
            self.pos_embed.copy_(sincos_pos_embed_2d(self.pos_embed.shape[-1], self.grid, device=self.pos_embed.device))
        xavier_init_linears_(self)  # also re-zeroes adaLN-Zero and the head via their init_weights()
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in backward (saves memory, costs one more forward)."""
        self.grad_checkpointing = enable

    def embed(self, t: Tensor, y: Tensor | None) -> Tensor:
        """``c = t_emb + y_emb`` (labels dropped at random in training mode)."""
        if y is None:
            if not self.y_embedder.has_null_label:
                raise UserError("this DiT has no null label (class_dropout_prob 0): pass labels y")
            y = self.y_embedder.null_labels(t.shape[0], device=t.device)
        return self.t_embedder(t) + self.y_embedder(y)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        check_inputs("DiT", x, y, self.in_channels, self.input_size, self.num_labels, self.x_embedder.proj.weight)
        t = as_time_vector(t, x.shape[0], x.device)
        cond = Conditioning(t=t, emb=self.embed(t, y), y=y)
        h = self.x_embedder(x) + self.pos_embed
        for blk in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                h = checkpoint(blk, h, cond, use_reentrant=False)
            else:
                h = blk(h, cond)
        h = self.final_layer(h, cond)
        return unpatchify(h, self.patch_size, self.out_channels, (self.grid, self.grid))

    def example_inputs(self, batch_size: int = 1) -> tuple[Tensor, Tensor, Tensor]:
        """``(x, t, y)`` on the model's device and dtype: a latent, DDPM indices, class labels."""
        w = self.x_embedder.proj.weight
        x = torch.randn(batch_size, self.in_channels, self.input_size, self.input_size, device=w.device, dtype=w.dtype)
        t = torch.randint(0, 1000, (batch_size,), device=w.device)
        y = torch.randint(0, self.num_classes, (batch_size,), device=w.device)
        return x, t, y
