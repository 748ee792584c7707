"""U-ViT's time conditioning: time enters as one more token, blocks use a plain LayerNorm.

U-ViT (Bao et al. 2023, "All are Worth Words") treats time like a word: the backbone
prepends the raw sinusoidal embedding of the time input, of the model's width ``D``
(optionally through Linear(D->4D), SiLU, Linear(4D->D)), to the token sequence, and every
block is an ordinary pre-norm Transformer block. So inside blocks this conditioner is just
U-ViT's LayerNorm (affine, eps 1e-5); its class attribute ``adds_time_token`` tells the
backbone to build the token (see ``zoo.backbones.uvit``).
"""

from __future__ import annotations

from .layernorm import LayerNorm


class TimeToken(LayerNorm):
    """Pre-norm LayerNorm of a block whose backbone prepends a time token (U-ViT).

    Args:
        dim: channels normalised.
        cond_dim: ignored (the time token needs no embedding inside blocks).
        eps: LayerNorm epsilon (U-ViT: 1e-5).
        affine: learn a per-channel scale and shift (U-ViT: yes).
    """

    needs_embedding = False
    adds_time_token = True
    ignores_time = False  # the time enters as the token it asks for
