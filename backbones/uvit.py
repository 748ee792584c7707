"""U-ViT (Bao et al. 2023, "All are Worth Words: A ViT Backbone for Diffusion Models").

Everything is a token: ``[label, time, patches]`` (the label token only for class-conditional
models) with a learned position table over all of them, ``depth // 2`` in-blocks, a mid-block
and ``depth // 2`` out-blocks joined by long skips (:class:`~zoo.blocks.skip_stack.LongSkipStack`),
then LayerNorm, Linear(D -> p²·C) on the patch tokens, unpatchify and an optional 3×3 conv.
The constructor keeps the official argument names, so an official config maps 1:1.

The time conditioning is the blocks' conditioner ``norm``: the default :class:`TimeToken`
(plain LayerNorm inside blocks) makes the backbone prepend the time token. Any other
conditioner swaps it out, e.g. ``norm: adaln_zero`` (DiMR paper, Table 2 row 2): then there
is no time token and the blocks read ``c = TimestepEmbedder(t) + label_emb(y)``, DiT-style
and as the DiMR paper writes adaLN (Eq. 3: MLP(Embed(t) + Embed(c))) -- so the label moves
from a token into ``c`` too and the sequence is only the patches.
"""

from __future__ import annotations

from typing import Annotated, Callable

import torch
from torch import Tensor, nn

from zoo.blocks.skip_stack import LongSkipStack
from zoo.blocks.transformer import TransformerBlock
from zoo.conditioning.base import (Conditioning, adds_time_token, as_time_vector, bind_unset, needs_embedding,
                                   norm_and_gate, time_blind, without_gate)
from zoo.conditioning.embeddings import TimestepEmbedder, timestep_sinusoid
from zoo.conditioning.layernorm import LayerNorm
from zoo.conditioning.time_dependent import STEP_TIME_SCALE
from zoo.conditioning.time_token import TimeToken
from zoo.domains import (MAX_CLASSES, MAX_DEPTH, Calls, Channels, ConditionerFactory, Divisible, Doc, FrequencyWidth, Heads,
                         ImageSize, PatchSize, Range, Ratio, Width)
from zoo.errors import UserError

from .common import PatchEmbed, PosEmbedInit, check_inputs, init_pos_embed_, refuse_block_settings, unpatchify

# Arguments U-ViT passes to every block; a block factory must leave them to U-ViT.
_BLOCK_ARGS = ("num_heads", "mlp_ratio", "qkv_bias", "norm", "cond_dim")


class UViT(nn.Module):
    """U-ViT on images or latents ``(B, in_chans, img_size, img_size)``.

    ``forward(x, t, y)`` takes ``t`` exactly as the official network does: the raw value fed to
    the sinusoid (``999·t`` for the continuous-time VP models, the step ``n`` in 1..1000 for
    discrete ones), and labels ``y`` when ``num_classes > 0`` (``num_classes`` counts the null
    label where there is one: 1001 = 1000 classes + null). Returns ``(B, in_chans, H, W)``.

    Args (official names first):
        mlp_time_embed: pass the time token through Linear(D->4D), SiLU, Linear(4D->D).
        num_classes: label table size; ``<= 0`` is unconditional (no label token).
        use_checkpoint: recompute block activations in the backward pass (memory for compute).
        conv: a final Conv2d(C->C, 3, pad 1) on the unpatchified output.
        skip: the long skips (concat + Linear(2D->D) before each out-block); ``false`` chains the blocks.
        block: block factory, called as ``block(embed_dim, num_heads=, mlp_ratio=, qkv_bias=,
            norm=, cond_dim=)``; U-ViT's is the pre-norm Transformer block with exact GELU.
        norm: the blocks' conditioner factory (default :class:`TimeToken`); time-dependent norms get
            ``time_scale = STEP_TIME_SCALE`` unless it is set (``t`` here spans 0..1000).
        head_norm: the norm before the output Linear (default U-ViT's LayerNorm); e.g.
            ``{type: adaln_zero, gate: false}`` for DiT's modulated head. A gate it returns is unused.
        frequency_dim: sinusoid width of the timestep MLP of embedding conditioners (DiT's 256); another
            value without such a conditioner is refused, as it would do nothing.
        pos_embed_init: ``normal`` (the released trunc-normal 0.02) or ``sincos`` (the patch
            positions start from the 2-D sin-cos table and are still learned; the emoji32 demo).
    """

    #: the ``diffusion.time_input`` values this backbone reads as it was built to (a DDPM step, 0..1000)
    time_inputs = ("uvit_continuous", "uvit_discrete", "dit_index")

    constraints = (Divisible("img_size", "patch_size"), Divisible("embed_dim", "num_heads"))

    def __init__(
        self,
        img_size: ImageSize = 224,
        patch_size: PatchSize = 16,
        in_chans: Channels = 3,
        embed_dim: Width = 768,
        depth: Annotated[int, Range(1, MAX_DEPTH), Doc("blocks: depth // 2 in, 1 mid, depth // 2 out, as the official "
                                                       "U-ViT builds them (depth 12: 13 blocks; 2 and 3: 3)")] = 12,
        num_heads: Heads = 12,
        mlp_ratio: Ratio = 4.0,
        qkv_bias: bool = False,
        mlp_time_embed: bool = False,
        num_classes: Annotated[int, Range(-1, MAX_CLASSES), Doc("<= 0: unconditional")] = -1,
        use_checkpoint: bool = False,
        conv: bool = True,
        skip: Annotated[bool, Doc("long skips from in- to out-blocks (false: the official skip=False ablation)")] = True,
        block: Annotated[Callable[..., nn.Module], Calls(1, _BLOCK_ARGS)] = TransformerBlock,
        norm: ConditionerFactory = TimeToken,
        head_norm: ConditionerFactory = LayerNorm,
        frequency_dim: FrequencyWidth = 256,
        pos_embed_init: PosEmbedInit = "normal",
    ):
        super().__init__()
        if img_size % patch_size:
            raise UserError(f"U-ViT img_size {img_size} is not divisible by patch_size {patch_size}")
        refuse_block_settings(block, _BLOCK_ARGS, "U-ViT")
        self.img_size = img_size
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.num_classes = num_classes
        self.num_labels = max(num_classes, 0)  # rows of the label table, the null label's included
        self.grid = img_size // patch_size
        self.pos_embed_init = pos_embed_init
        if adds_time_token(head_norm):
            raise UserError("time_token as head_norm would be a plain LayerNorm: the time token joins the blocks' "
                            "sequence only", key_path="model.head_norm", suggestion="use layernorm (U-ViT's) or adaln_zero")
        head_norm = without_gate(head_norm, "model.head_norm")  # its gate would be discarded: allocate none
        # TD norms: t is the DDPM step (or 999·t), not DiMR's log-SNR
        norm, head_norm = (bind_unset(f, "time_scale", STEP_TIME_SCALE) for f in (norm, head_norm))
        self.time_token = adds_time_token(norm)
        self.needs_embedding = needs_embedding(norm) or needs_embedding(head_norm)
        if frequency_dim != 256 and not self.needs_embedding:
            raise UserError("frequency_dim sizes the timestep MLP of embedding conditioners (adaln_zero); this U-ViT "
                            "has none, so it would do nothing", key_path="model.frequency_dim",
                            suggestion="drop frequency_dim")
        if mlp_time_embed and not self.time_token:
            raise UserError("mlp_time_embed acts on the time token; this conditioner adds none",
                            key_path="model.mlp_time_embed", suggestion="set it false, or use the time_token norm")
        # the blocks' conditioner decides: a head norm alone that embeds the label (adaLN-Zero) would
        # otherwise take the label token out of every block, leaving the label to the last norm only
        self.label_token = num_classes > 0 and not needs_embedding(norm)
        self.num_extra_tokens = int(self.label_token) + int(self.time_token)
        cond_dim = embed_dim if self.needs_embedding else None

        self.patch_embed = PatchEmbed(in_chans, embed_dim, patch_size)
        if self.time_token:
            self.time_embed = (
                nn.Sequential(nn.Linear(embed_dim, 4 * embed_dim), nn.SiLU(), nn.Linear(4 * embed_dim, embed_dim))
                if mlp_time_embed
                else nn.Identity()
            )
        if self.needs_embedding:
            self.t_embedder = TimestepEmbedder(embed_dim, frequency_dim)
        if num_classes > 0:
            self.label_emb = nn.Embedding(num_classes, embed_dim)  # a token, or added into c
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_extra_tokens + self.grid**2, embed_dim))
        self.blocks = LongSkipStack(
            embed_dim,
            depth,
            lambda: block(
                embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, norm=norm, cond_dim=cond_dim
            ),
            long_skips=skip,
        )
        self.norm = head_norm(embed_dim, cond_dim=cond_dim)
        self.decoder_pred = nn.Linear(embed_dim, patch_size**2 * in_chans)
        self.final_layer = nn.Conv2d(in_chans, in_chans, 3, padding=1) if conv else nn.Identity()
        if time_blind(self, norm, head_norm):
            raise UserError("with these norms no layer of the U-ViT sees the time t (plain norms and no time token)",
                            key_path="model.norm",
                            suggestion="use norm: time_token (U-ViT's own), adaln_zero, td_layernorm or td_rmsnorm")
        self.init_weights()
        self.set_grad_checkpointing(use_checkpoint)

    def init_weights(self) -> None:
        """U-ViT's init: trunc-normal(0.02) Linear weights and position table (or its sin-cos start,
        ``pos_embed_init``), zero biases,
        LayerNorm ones/zeros; PyTorch defaults for convs and the label table; then each
        submodule's own ``init_weights`` hook (e.g. adaLN-Zero's zero modulation)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        init_pos_embed_(self.pos_embed, self.grid, self.pos_embed_init, extra_tokens=self.num_extra_tokens)
        for m in self.modules():
            if m is not self and callable(getattr(m, "init_weights", None)):
                m.init_weights()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in backward (the official ``use_checkpoint``)."""
        self.blocks.grad_checkpointing = enable

    def embed(self, t: Tensor, y: Tensor | None) -> Tensor | None:
        """``c = t_emb (+ label_emb)`` for embedding conditioners (adaLN-Zero); ``None`` otherwise."""
        if not self.needs_embedding:
            return None
        emb = self.t_embedder(t)
        if self.num_classes > 0:
            emb = emb + self.label_emb(self._labels(y))
        return emb

    def _labels(self, y: Tensor | None) -> Tensor:
        if y is None:
            raise UserError(
                f"this U-ViT is class-conditional (num_classes={self.num_classes}): pass labels y "
                f"(label {self.num_classes - 1} is the null class of models trained with label dropout)"
            )
        return y

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        check_inputs("U-ViT", x, y, self.in_chans, self.img_size, self.num_labels, self.patch_embed.proj.weight)
        t = as_time_vector(t, x.shape[0], x.device)
        cond = Conditioning(t=t, emb=self.embed(t, y), y=y)
        h = self.patch_embed(x)
        extra = []
        if self.label_token:
            extra.append(self.label_emb(self._labels(y))[:, None])
        if self.time_token:
            extra.append(self.time_embed(timestep_sinusoid(t, self.embed_dim).to(h.dtype))[:, None])
        if extra:
            h = torch.cat([*extra, h], dim=1)
        h, _ = self.blocks(h + self.pos_embed, cond)
        h, _ = norm_and_gate(self.norm, h, cond)
        h = self.decoder_pred(h[:, self.num_extra_tokens :])
        return self.final_layer(unpatchify(h, self.patch_size, self.in_chans, (self.grid, self.grid)))

    def example_inputs(self, batch_size: int = 1) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(x, t, y)`` on the model's device and dtype (works on ``meta``): an image, the raw
        sinusoid input in [0, 999), labels (``None`` when unconditional)."""
        w = self.patch_embed.proj.weight
        x = torch.randn(batch_size, self.in_chans, self.img_size, self.img_size, device=w.device, dtype=w.dtype)
        t = torch.empty(batch_size, device=w.device).uniform_(0, 999)  # not rand * 999: a scalar op on meta imports Dynamo (2 s)
        y = torch.randint(0, self.num_classes, (batch_size,), device=w.device) if self.num_classes > 0 else None
        return x, t, y
