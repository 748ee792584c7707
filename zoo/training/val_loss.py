"""``train.val_every``: the training objective of the EMA weights on images the run does not train on.

The logged training loss is the mean of a few noisy batches, each at random times and noise, so
two runs (or two points of one run) differ by more than their models do. The validation loss
evaluates a fixed set of ``train.val_n`` (image, time, noise) triples every time:

* the images are the dataset's ``holdout`` split when it has one (``emoji32``), else a fixed seeded
  subset of the training images (then it measures the fit, not generalisation; the record says so);
  triple j takes image j mod (number of images);
* the times are stratified: one per stratum of the schedule's N steps (or of [t_min, 1] for a
  continuous schedule), dealt to the triples in a fixed seeded order, so every value sees the
  whole schedule in the same proportion;
* the noise of triple j is drawn from its own generator (seed, j), and no label is dropped.

The loss is the recipe's objective (its prediction, Min-SNR weights, multi-scale terms) in the
weights' dtype (no autocast), of a copy of the model that holds the EMA weights, in eval mode.
The global RNG is left as it was, so the training losses are those of a run without it. Rank 0
evaluates; the other processes wait at a barrier (:func:`zoo.training.eval_hook.evaluation`).
"""

from __future__ import annotations

import time
from typing import Any, Mapping

import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset

from zoo.modes import evaluating
from zoo.training.data import held_out
from zoo.training.sections import UNSET_MEANS

VAL_N = UNSET_MEANS["val_n"]  # (image, time, noise) triples per evaluation unless train.val_n says otherwise
VAL_STREAM = 18  # the generator stream of the triples' noise and time order (see zoo.training.draws)
VAL_BATCH = 64  # triples per forward pass: bounded memory whatever val_n is


class ValLoss:
    """Rank 0's validation loss of one run: its images, times and the objective."""

    def __init__(self, recipe: Mapping[str, Any], train: Mapping[str, Any], dataset: Dataset,
                 shape: tuple[int, ...], objective, device: torch.device) -> None:
        from zoo.sample import num_classes

        self.n, self.seed = int(train.get("val_n") or VAL_N), int(train.get("seed") or 0)
        self.shape, self.objective, self.device = shape, objective, device
        self.images, self.source = held_out(recipe.get("data") or {}, dataset, shape, num_classes(recipe), self.seed,
                                            limit=self.n)
        self.conditional = num_classes(recipe) is not None
        # A subset reads through to its dataset, so that a dataset that draws (prepared latents: a view and
        # a sample of the VAE posterior per item) gets the item's fixed key, not the global RNG.
        self.base, self.index = ((self.images.dataset, list(self.images.indices)) if isinstance(self.images, Subset)
                                 else (self.images, range(len(self.images))))
        self.keyed = bool(getattr(self.base, "keyed_draws", False))
        self.times = stratified_times(self.n, objective, self.seed)

    def _item(self, j: int) -> tuple[Tensor, int]:
        from zoo.seeds import sample_seed

        i = j % len(self.index)
        return self.base[(self.index[i], sample_seed(self.seed, i, VAL_STREAM + 1)) if self.keyed else self.index[i]]

    def _batch(self, js: range) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor, Tensor]]:
        from zoo.seeds import sample_seed

        items = [self._item(j) for j in js]
        x = torch.stack([x for x, _ in items])
        y = torch.tensor([int(y) for _, y in items])
        noise = torch.stack([torch.randn(self.shape, generator=torch.Generator().manual_seed(
            sample_seed(self.seed, j, VAL_STREAM))) for j in js])
        keep = torch.ones(len(js))  # a label-drop uniform of 1: no label is dropped
        return x, y, (self.times[js.start:js.stop], noise, keep)

    @torch.no_grad()
    def __call__(self, ema_model: torch.nn.Module, step: int) -> dict:
        """The validation record at ``step`` of ``ema_model``, a copy of the model holding the EMA weights."""
        start = time.perf_counter()
        dtype = next(ema_model.parameters()).dtype
        total = torch.zeros((), dtype=torch.float64, device=self.device)  # read once, at the end: no wait per batch
        with evaluating(ema_model), torch.random.fork_rng(devices=[]):
            for first in range(0, self.n, VAL_BATCH):
                x, y, draws = self._batch(range(first, min(first + VAL_BATCH, self.n)))
                x = x.to(self.device, dtype)
                y = y.to(self.device) if self.conditional else None
                total += self.objective(ema_model, x, y, draws=draws)["loss"].double().sum()
        return {"step": step, "val_loss": float(total) / self.n, "val_n": self.n, "val_source": self.source,
                "val_seconds": time.perf_counter() - start}


def stratified_times(n: int, objective, seed: int) -> Tensor:
    """``n`` diffusion times (float64), one per stratum of the schedule, in a fixed seeded order.

    Discrete schedule of N steps: stratum k of n holds step ⌊(k + ½)·N/n⌋ (every step once when
    n = N); continuous: the midpoint of [t_min, 1] cut into n parts."""
    from zoo.diffusion.time_input import index_to_time
    from zoo.seeds import sample_seed

    mid = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    if objective.continuous:
        t = objective.t_min + (1.0 - objective.t_min) * mid
    else:
        t = index_to_time(torch.floor(mid * objective.num_steps).long(), objective.num_steps)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(sample_seed(seed, 0, VAL_STREAM + 2)))
    return t[order]


def val_hook(recipe: Mapping[str, Any], train: Mapping[str, Any], dataset: Dataset, shape: tuple[int, ...],
             objective, ctx) -> ValLoss | None:
    """Rank 0's :class:`ValLoss` when ``train.val_every`` asks for one (``None`` elsewhere)."""
    if not int(train.get("val_every") or 0) or not ctx.main:
        return None
    return ValLoss(recipe, train, dataset, shape, objective, ctx.device)
