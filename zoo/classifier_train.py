"""Train the small ConvNeXt classifier (:mod:`zoo.classifier`) on a registered dataset; report holdout accuracy.

The data come from a recipe's ``data`` section or a dataset name (``emoji32``). A dataset with
a ``holdout`` split (emoji32) trains on ``train`` and is scored on ``holdout``; any other holds
out 10% of every class (seeded, the split emoji32 uses) and trains on the rest. The data are
read once into memory: this classifier is for small pixel datasets; ImageNet-sized work uses a
timm classifier (``zoo eval --distortion --classifier timm:NAME``).

Training: AdamW with linear warm-up and cosine decay, label smoothing 0.1, random translations of
up to ``shift`` pixels (edge padding; no flips: emoji and text are not mirror-symmetric).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from zoo.classifier import ConvNeXtClassifier, accuracy
from zoo.errors import UserError
from zoo.training.optim import learning_rate
from zoo.training.sections import data_setting

HOLDOUT_FRACTION = 0.1


@dataclass
class ClassifierData:
    """Train and holdout tensors (images in [-1, 1]) and where they came from."""

    train_x: Tensor
    train_y: Tensor
    holdout_x: Tensor
    holdout_y: Tensor
    num_classes: int
    data: dict
    holdout: str  # how the holdout was made


def _tensors(dataset) -> tuple[Tensor, Tensor]:
    loader = torch.utils.data.DataLoader(dataset, batch_size=512, shuffle=False)
    xs, ys = zip(*[(x, torch.as_tensor(y)) for x, y in loader])
    return torch.cat(xs).float(), torch.cat(ys).long()


def load_data(source: str, image_size: int | None = None, overrides: list[str] = (), seed: int = 0) -> ClassifierData:
    """The classifier's data from a recipe file or a registered dataset name (see the module docstring)."""
    import zoo
    from zoo import registry
    from zoo.sample import num_classes
    from zoo.training.data import build_dataset, gives_latents
    from zoo.training.emoji import holdout_mask

    path = Path(source)
    if path.suffix in (".yaml", ".yml") or (path.exists() and source not in registry.names("dataset")):
        recipe = zoo.load_recipe(source, list(overrides))
        data, classes = dict(recipe.get("data") or {}), num_classes(recipe)
        if gives_latents(data):
            raise UserError(f"{source} trains on VAE latents; the classifier needs pixels: for ImageNet use "
                            f"zoo eval --distortion --classifier timm:NAME --classifier-weights FILE")
    elif source in registry.names("dataset"):
        if overrides:  # they were ignored without a word (--set data.image_size=16 trained at 32)
            raise UserError(f"--set applies to a recipe, and {source} is a dataset name",
                            suggestion=f"give a recipe file whose data section names dataset {source} "
                            "(--image-size sets the size)")
        data, classes = {"dataset": source}, None
    else:
        raise UserError(f"{source} is neither a recipe file nor a registered dataset "
                        f"({', '.join(registry.names('dataset'))})")
    size = int(image_size or data.get("image_size") or 32)
    data["image_size"] = size
    if data.pop("split", "train") != "train":  # a recipe's holdout split: the classifier is scored on it, not trained
        raise UserError(f"data.split is {recipe['data']['split']!r}: the classifier trains on the train split and is "
                        "scored on the held-out images itself", key_path="data.split",
                        suggestion="remove data.split (or --set data.split=train)")
    builder = registry.get("dataset", data_setting(data, "dataset"))
    shape = (3, size, size)
    if "holdout" in getattr(builder, "splits", ()):
        train_x, train_y = _tensors(build_dataset({**data, "split": "train"}, shape, classes, seed))
        holdout_x, holdout_y = _tensors(build_dataset({**data, "split": "holdout"}, shape, classes, seed))
        how = "the dataset's holdout split"
    else:
        x, y = _tensors(build_dataset(data, shape, classes, seed))
        mask = holdout_mask(y, HOLDOUT_FRACTION, seed)
        train_x, train_y, holdout_x, holdout_y = x[~mask], y[~mask], x[mask], y[mask]
        how = f"{HOLDOUT_FRACTION:.0%} of every class, seed {seed}"
    classes = int(classes or int(torch.cat([train_y, holdout_y]).max()) + 1)
    if len(train_x) == 0 or len(holdout_x) == 0:
        raise UserError(f"{source}: {len(train_x)} training and {len(holdout_x)} holdout images; both need some")
    return ClassifierData(train_x, train_y, holdout_x, holdout_y, classes, data, how)


def shift(x: Tensor, pixels: int, generator: torch.Generator) -> Tensor:
    """Translate each image by its own random offset in [-pixels, pixels]² (edge padding), one gather."""
    if pixels <= 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (pixels,) * 4, mode="replicate")
    dy, dx = (torch.randint(0, 2 * pixels + 1, (2, b), generator=generator))
    rows = (torch.arange(h)[None] + dy[:, None])[:, :, None]  # (B, H, 1)
    cols = (torch.arange(w)[None] + dx[:, None])[:, None, :]  # (B, 1, W)
    return padded[torch.arange(b)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)  # (B, H, W, C) -> NCHW


class ClassifierDiverged(RuntimeError):
    """Training went to NaN or inf; the classifier is not saved."""

    def __init__(self, what: str, lr: float) -> None:
        super().__init__(f"{what}; stopped, nothing saved (try a lower --lr than {lr:g})")


def train_classifier(data: ClassifierData, steps: int = 1500, batch_size: int = 64, lr: float = 2e-3,
                     weight_decay: float = 0.05, seed: int = 0, pixels: int = 2, device: str = "cpu",
                     arch: dict[str, Any] | None = None, log: Callable[[str], None] = print,
                     log_every: int = 100) -> tuple[ConvNeXtClassifier, dict]:
    """Train a classifier on ``data.train_*``; return it (eval mode) and its record (holdout accuracy, ...)."""
    if steps < 1 or batch_size < 1:
        raise UserError(f"--steps and --batch-size must be at least 1, got {steps} and {batch_size}")
    torch.manual_seed(seed)
    size = int(data.train_x.shape[-1])
    model = ConvNeXtClassifier(data.num_classes, int(data.train_x.shape[1]), size, **(arch or {})).to(device)
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": no_decay,
                                                                                "weight_decay": 0.0}], lr=lr)
    g = torch.Generator().manual_seed(seed)
    n, order, cursor = len(data.train_x), torch.randperm(len(data.train_x), generator=g), 0
    warmup, start, loss_sum = max(1, min(100, steps // 10)), time.perf_counter(), 0.0
    schedule = {"lr": lr, "steps": steps, "warmup_steps": warmup, "lr_schedule": "cosine"}
    model.train()
    for step in range(steps):
        if cursor + batch_size > n:
            order, cursor = torch.randperm(n, generator=g), 0
        idx = order[cursor:cursor + batch_size]
        cursor += batch_size
        x = shift(data.train_x[idx], pixels, g).to(device)
        loss = F.cross_entropy(model(x), data.train_y[idx].to(device), label_smoothing=0.1)
        for group in opt.param_groups:
            group["lr"] = learning_rate(schedule, step)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise ClassifierDiverged(f"the loss is {loss_value} at step {step + 1}", lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_sum += loss_value
        if log_every and ((step + 1) % log_every == 0 or step + 1 == steps):
            log(f"zoo train-classifier: step {step + 1}/{steps}  loss {loss_sum / ((step % log_every) + 1):.4f}  "
                f"{(step + 1) / (time.perf_counter() - start):.1f} steps/s")
            loss_sum = 0.0
    if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):  # the last step's update
        raise ClassifierDiverged(f"the weights hold NaN or inf after step {steps}", lr)
    model.eval()
    counts = torch.bincount(data.holdout_y, minlength=data.num_classes)
    record = {
        "holdout_accuracy": accuracy(model, data.holdout_x, data.holdout_y),
        "train_accuracy": accuracy(model, data.train_x, data.train_y),
        "majority_baseline": float(counts.max()) / len(data.holdout_y),
        "holdout_size": len(data.holdout_y), "train_size": n, "holdout": data.holdout, "data": data.data,
        "train": {"steps": steps, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "seed": seed,
                  "shift_pixels": pixels, "label_smoothing": 0.1},
        "seconds": round(time.perf_counter() - start, 1),
    }
    return model.requires_grad_(False), record
