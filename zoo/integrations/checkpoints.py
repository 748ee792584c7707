"""The model of a zoo checkpoint directory as the integrations load it: EMA weights when there are any."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def load_preferred(directory: str | Path, use_ema: bool = True,
                   device: str | torch.device = "cpu") -> tuple[nn.Module, dict, str]:
    """``(model, recipe, "ema" | "model")``: the EMA weights if ``use_ema`` and saved, else the model's.

    EMA first, as ``zoo sample`` and timm's ``load_checkpoint(use_ema=True)`` do; loading is strict.
    A ``zoo train`` run directory stands for its newest checkpoint ``last/``, as in ``zoo sample``.
    """
    from zoo.checkpoint import EMA, checkpoint_of, load_checkpoint

    directory = checkpoint_of(directory)
    weights = "ema" if use_ema and (Path(directory) / EMA).is_file() else "model"
    model, recipe = load_checkpoint(directory, weights=weights, device=device)
    return model, recipe, weights
