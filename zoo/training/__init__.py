"""Training: the loop (``loop``), where its weights come from on ``--resume`` or ``train.init_from``
(``resume``), data streams (``data``), AdamW groups and warm-up (``optim``),
the fp32 EMA (``ema``), what a run logs (``monitor``; an FD with ``eval_hook``, a validation loss
with ``val_loss``) and the ``data``/``train`` recipe-section validators (``sections``).

``Trainer`` and ``train`` are loaded on first use, so importing the section validators (which
recipe validation does) does not import torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Trainer", "train"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from zoo.training import loop

        return getattr(loop, name)
    raise AttributeError(f"module 'zoo.training' has no attribute {name!r}")
