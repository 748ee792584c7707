"""The model of a zoo checkpoint directory as the integrations load it: EMA weights when there are any."""

from __future__ import annotations

from pathlib import Path

from torch import nn


def load_preferred(directory: str | Path, use_ema: bool = True) -> tuple[nn.Module, dict, str]:
    """``(model, recipe, "ema" | "model")``: the EMA weights if ``use_ema`` and saved, else the model's.

    EMA first, as ``zoo sample`` and timm's ``load_checkpoint(use_ema=True)`` do; loading is strict.
    """
    from zoo.checkpoint import EMA, load_checkpoint

    weights = "ema" if use_ema and (Path(directory) / EMA).is_file() else "model"
    model, recipe = load_checkpoint(directory, weights=weights)
    return model, recipe, weights
