"""Time and class embeddings: the sinusoid, DiT's timestep MLP and its label table.

U-ViT's time token reuses :func:`timestep_sinusoid` (with dim D, no MLP); DiT feeds the
256-dim sinusoid through :class:`TimestepEmbedder` and adds :class:`LabelEmbedder`'s row.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def timestep_sinusoid(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features of ``t`` (Vaswani et al. 2017), cos first, always float32.

    With ``half = dim // 2`` and ``f_k = exp(-ln(max_period) * k / half)``, ``k = 0..half-1``,
    returns ``[cos(t f) | sin(t f)]`` of shape ``(B, dim)``; an odd ``dim`` gets one zero
    column at the end. ``t`` may be integer (DiT's DDPM index) or float, ``(B,)`` or scalar;
    the features are computed in float32 whatever its dtype, as DiT and U-ViT do.
    """
    t = torch.as_tensor(t).reshape(-1).float()
    half = dim // 2
    freqs = _frequencies(half, float(max_period), t.device)
    angles = t[:, None] * freqs[None]
    emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def _frequency_table(half: int, max_period: float, device: torch.device) -> Tensor:
    """``f_k = exp(-ln(max_period) * k / half)``, ``k = 0..half-1``, float32."""
    return torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=device) / half)


@functools.lru_cache(maxsize=64)
def _cached_frequency_table(half: int, max_period: float, device: torch.device) -> Tensor:
    with torch.inference_mode(False):  # an ordinary tensor even when first asked under inference mode
        return _frequency_table(half, max_period, device)


def _frequencies(half: int, max_period: float, device: torch.device) -> Tensor:
    """The sinusoid's frequency table, built once per (size, period, device): three small ops (and on a GPU three
    kernel launches) less in every forward. Built afresh where a cached tensor would be wrong or escape: while
    Dynamo compiles or ``torch.jit.trace`` records (the ops belong in the graph), and under a dispatch mode (a
    ``FakeTensorMode`` would leave a fake tensor in the cache)."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch._C._len_torch_dispatch_stack():
        return _frequency_table(half, max_period, device)
    return _cached_frequency_table(half, max_period, device)


class TimestepEmbedder(nn.Module):
    """DiT's time embedding: ``Linear(SiLU(Linear(sinusoid_256(t))))`` of width ``hidden_size``."""

    def __init__(self, hidden_size: int, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(
            nn.Linear(frequency_dim, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    def forward(self, t: Tensor) -> Tensor:
        freq = timestep_sinusoid(t, self.frequency_dim)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class embedding table with an extra null row ``num_classes`` for classifier-free guidance.

    The null row exists only when ``dropout_prob > 0`` (as in DiT). In training mode each label
    is replaced by the null label with probability ``dropout_prob``; ``force_drop_ids`` (1 =
    drop) replaces chosen labels regardless of mode, for building the unconditional half of a
    guided batch.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float = 0.0):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)

    @property
    def has_null_label(self) -> bool:
        return self.dropout_prob > 0

    def null_labels(self, batch_size: int, device: torch.device | None = None) -> Tensor:
        """A batch of the null label (requires ``dropout_prob > 0``)."""
        if not self.has_null_label:
            raise ValueError("this label embedder has no null class (class_dropout_prob is 0)")
        return torch.full((batch_size,), self.num_classes, dtype=torch.long, device=device)

    def drop_labels(self, labels: Tensor, force_drop_ids: Tensor | None = None) -> Tensor:
        """Replace labels by the null label: at random (p = dropout_prob) or where ``force_drop_ids == 1``."""
        if force_drop_ids is None:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop = force_drop_ids == 1
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels: Tensor, force_drop_ids: Tensor | None = None) -> Tensor:
        if force_drop_ids is not None and not self.has_null_label:
            raise ValueError("cannot drop labels: this label embedder has no null class (class_dropout_prob is 0)")
        if (self.training and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.drop_labels(labels, force_drop_ids)
        return self.embedding_table(labels)
