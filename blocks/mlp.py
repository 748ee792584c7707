"""Feed-forward layers a block uses after its second norm: timm's ``Mlp`` and ``GluMlp``.

zoo's registered names keep zoo's constructor (``dim``, ``hidden_features`` from the parent,
``act`` as a recipe string); the layers themselves are timm's, so their state-dict keys are
``fc1``/``fc2`` as in DiT, U-ViT and DiMR and official weights load unchanged.
"""

from __future__ import annotations

from functools import partial
from typing import Annotated, Callable

from timm.layers import GluMlp, Mlp as TimmMlp
from torch import nn

from zoo.domains import OneOf, Width

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "gelu": nn.GELU,  # exact (erf) GELU: U-ViT, DiMR
    "gelu_tanh": partial(nn.GELU, approximate="tanh"),  # DiT
    "silu": nn.SiLU,
}
Activation = Annotated[str, OneOf(ACTIVATIONS, "activation")]


def activation_layer(name: str) -> Callable[[], nn.Module]:
    """The activation factory called ``name`` (one of ``ACTIVATIONS``), as timm's ``act_layer``."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def make_activation(name: str) -> nn.Module:
    """An activation module by name (one of ``ACTIVATIONS``)."""
    return activation_layer(name)()


class Mlp(TimmMlp):
    """Linear -> activation -> Linear (the ViT/DiT/U-ViT MLP; timm's ``Mlp``, hidden 4·dim by default)."""

    def __init__(self, dim: Width, hidden_features: Width | None = None, act: Activation = "gelu", bias: bool = True):
        super().__init__(dim, hidden_features or 4 * dim, act_layer=activation_layer(act), bias=bias)


class GeGluMlp(GluMlp):
    """GeGLU feed-forward (Shazeer 2020): ``W2(GELU(W0 u) * W1 u)``, as in DiMR (timm's ``GluMlp``).

    ``W0`` and ``W1`` are fused into one ``fc1`` of width ``2 * hidden`` (one GEMM instead of
    two); the first half of its output is the gated (GELU) half (``gate_last=False``).
    """

    def __init__(self, dim: Width, hidden_features: Width | None = None, act: Activation = "gelu", bias: bool = True):
        hidden_features = hidden_features or 2 * dim
        super().__init__(dim, 2 * hidden_features, act_layer=activation_layer(act), bias=bias, gate_last=False)

    def init_weights(self) -> None:
        """Keep the parent's init: timm's gate init (bias 1, weight ~0) is not DiMR's trunc-normal one."""
