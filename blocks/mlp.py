"""Feed-forward layers a block uses after its second norm: the plain MLP and GeGLU.

They do the job of timm's ``Mlp`` and ``GluMlp(gate_last=False)`` with the same ``fc1``/``fc2``
keys and the same outputs (tests/test_integrations_timm.py checks both), but are not them:
importing ``timm.layers`` imports torchvision and took 1.2-1.4x torch's own import time here
(import torch is 2.1-3.1 s of a 3.6-4.6 s ``zoo build --flops``: +2.5-4 s, past the 5 s target).
"""

from __future__ import annotations

import math
from typing import Annotated

from torch import Tensor, nn

from zoo.domains import OneOf, Width
from zoo.errors import UserError

from .geglu import APPROXIMATE, geglu_gate

ACTIVATIONS = {
    "gelu": lambda: nn.GELU(),  # exact (erf) GELU: U-ViT, DiMR
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),  # DiT
    "silu": lambda: nn.SiLU(),
}
Activation = Annotated[str, OneOf(ACTIVATIONS, "activation")]


def mlp_width(dim: int, mlp_ratio: float) -> int:
    """The hidden width ``int(dim · mlp_ratio)`` of a block's MLP, truncated as DiT's and U-ViT's
    constructors do (mlp_ratio 2.7 at width 384: 1036, the official checkpoints' shape).

    A product within 1e-9 of an integer is that integer: a ratio given as hidden/dim (as DiMR's
    converter does) can land one rounding below it. A ratio that makes the width 0 is a mistake
    (the MLPs used to take 0 as "not given" and build their default width instead).
    """
    product = dim * mlp_ratio
    nearest = round(product)
    hidden = nearest if abs(product - nearest) <= 1e-9 * max(1.0, abs(product)) else math.floor(product)
    if hidden < 1:
        raise UserError(f"mlp_ratio {mlp_ratio:g} gives a block of width {dim} an MLP of {hidden} features",
                        suggestion=f"use mlp_ratio >= {1 / dim:.3g}")
    return hidden


def make_activation(name: str) -> nn.Module:
    """An activation module by name (one of ``ACTIVATIONS``)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


class Mlp(nn.Module):  # = timm.layers.Mlp; not subclassed: importing timm adds 2.5-4 s per command (module doc)
    """Linear -> activation -> Linear (the ViT/DiT/U-ViT MLP)."""

    def __init__(self, dim: Width, hidden_features: Width | None = None, act: Activation = "gelu", bias: bool = True):
        super().__init__()
        hidden_features = 4 * dim if hidden_features is None else hidden_features
        self.fc1 = nn.Linear(dim, hidden_features, bias=bias)
        self.act = make_activation(act)
        self.fc2 = nn.Linear(hidden_features, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class GeGluMlp(nn.Module):  # = timm.layers.GluMlp(gate_last=False, 2·hidden); same import-time reason
    """GeGLU feed-forward (Shazeer 2020): ``W2(GELU(W0 u) * W1 u)``, as in DiMR.

    ``W0`` and ``W1`` are fused into one ``fc1`` of width ``2 * hidden`` (one GEMM instead of
    two); the first half of its output is the gated (GELU) half. ``hidden_features`` defaults to
    ``2 * dim``, DiMR's GeGLU ratio 2.
    """

    def __init__(self, dim: Width, hidden_features: Width | None = None, act: Activation = "gelu", bias: bool = True):
        super().__init__()
        hidden_features = 2 * dim if hidden_features is None else hidden_features
        self.fc1 = nn.Linear(dim, 2 * hidden_features, bias=bias)
        self.act = make_activation(act)
        self.act_name = act
        self.fc2 = nn.Linear(hidden_features, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.act_name in APPROXIMATE:  # GELU: the gate with an in-place backward (no concatenation)
            return self.fc2(geglu_gate(self.fc1(x), self.act_name))
        gate, value = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(self.act(gate) * value)
