"""Sample quality: ``zoo eval`` (FD, Inception Score, precision/recall, per-class FD).

* :func:`frechet_distance` — FD between two Gaussians, float64, never NaN or complex;
* :func:`evaluate` — sample a checkpoint into resumable shards and score it (``zoo eval``);
* :func:`quick_fd` — a small FD of a model in memory (``train.eval_every``);
* extractors are the registry kind ``extractor`` (:mod:`zoo.eval.extractors`).

Importing this package does not import torch or numpy; the functions load their modules on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from zoo.eval.runner import EvalRequest, evaluate, quick_fd
    from zoo.eval.stats import feature_statistics, frechet_distance

__all__ = ["frechet_distance", "feature_statistics", "evaluate", "quick_fd", "EvalRequest"]


def __getattr__(name: str) -> Any:
    if name in ("frechet_distance", "feature_statistics"):  # numpy: not for the command line's parsers (zoo --help)
        from zoo.eval import stats

        return getattr(stats, name)
    if name in ("evaluate", "quick_fd", "EvalRequest"):
        from zoo.eval import runner

        return getattr(runner, name)
    raise AttributeError(f"module 'zoo.eval' has no attribute {name!r}")
