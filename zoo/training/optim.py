"""AdamW for a recipe's ``train`` section: parameter groups with and without weight decay, warm-up.

No decay for the parameters :func:`no_weight_decay_names` lists (DiMR's time-dependent gates
``w`` and ``b``), and for every bias / norm weight (1-D parameters) only if
``train.no_weight_decay_1d`` is true. Frozen parameters (DiT's fixed position table) are left out.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import nn

from zoo.conditioning.time_dependent import no_weight_decay_names


def param_groups(model: nn.Module, weight_decay: float, no_decay_1d: bool = False) -> list[dict]:
    """``[{params: decayed, weight_decay}, {params: not decayed, weight_decay: 0}]`` with names kept."""
    skip = no_weight_decay_names(model)
    decay, no_decay = ([], []), ([], [])
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        target = no_decay if name in skip or (no_decay_1d and p.ndim <= 1) else decay
        target[0].append(name)
        target[1].append(p)
    return [
        {"params": decay[1], "names": decay[0], "weight_decay": weight_decay},
        {"params": no_decay[1], "names": no_decay[0], "weight_decay": 0.0},
    ]


def recipe_groups(model: nn.Module, train: Mapping[str, Any]) -> list[dict]:
    """The non-empty parameter groups AdamW gets for ``train``; a resume compares a checkpoint's with them."""
    groups = param_groups(model, float(train.get("weight_decay", 0.0)), bool(train.get("no_weight_decay_1d", False)))
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, train: Mapping[str, Any]) -> torch.optim.AdamW:
    """AdamW (fused where this torch supports it for the parameters' device)."""
    groups = recipe_groups(model, train)
    kwargs = dict(lr=float(train["lr"]), betas=tuple(float(b) for b in train.get("betas", (0.9, 0.999))))  # YAML 0 is an int
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(groups, **kwargs)


def learning_rate(train: Mapping[str, Any], step: int) -> float:
    """Linear warm-up over ``warmup_steps``, then ``lr_schedule``: constant, or a cosine / linear decay
    from ``lr`` at the end of warm-up to ``min_lr`` at step ``steps``.

    The update of step ``step`` (0 = the first) runs at ``lr * step / warmup_steps`` during warm-up, as
    U-ViT's and DiMR's ``LambdaLR(min(step / warmup, 1))``: the first update has lr 0 (AdamW's moments
    take in the first gradient, the weights stay).
    """
    lr, warmup = float(train["lr"]), int(train.get("warmup_steps", 0) or 0)
    if warmup > 0 and step < warmup:
        return lr * step / warmup
    kind, total = train.get("lr_schedule", "constant"), int(train.get("steps", 0) or 0)
    if kind == "constant" or total <= warmup:
        return lr
    floor = float(train.get("min_lr", 0.0) or 0.0)
    progress = min(1.0, (step - warmup) / (total - warmup))
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress
    return floor + (lr - floor) * shape
