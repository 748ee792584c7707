"""Distortion analysis (the DiMR paper's §5.3, automated): how many samples a classifier rejects as their class.

A classifier scores each generated sample for its own class, the label it was generated with;
a sample whose own-class softmax probability is below ``threshold`` counts as distorted. The
share of such samples is reported over all samples and per class, the per-sample probabilities
are saved (``.npz``), and the rejected samples (lowest probability first, at most
``grid_limit``) are tiled into a PNG grid; all written atomically beside the eval JSON, which
gains a ``distortion`` entry with the protocol (classifier and its weights hash, threshold, rule).

The classifier (``--classifier``) is

* a directory written by ``zoo train-classifier`` (the emoji32 ConvNeXt): it must have been
  trained on the generator's classes and image size;
* ``timm:NAME`` with ``--classifier-weights FILE`` (``.safetensors`` or a plain ``.pth``/``.pt``
  state dict): any timm classifier, e.g. an ImageNet ResNet for ImageNet models; images are
  resized and normalised as the model's timm data config says. Nothing is downloaded.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.errors import UserError

TIMM_PREFIX = "timm:"
RULE = "own-class softmax probability < threshold"


class Scorer(nn.Module):
    """uint8 images (B, 3, H, W) -> class probabilities (B, num_classes), float64."""

    num_classes: int = 0
    image_size: int | None = None  # the size it insists on (None: it resizes)

    def describe(self) -> dict:
        """What a result records about the classifier."""
        raise NotImplementedError


class ZooClassifierScorer(Scorer):
    """A ``zoo train-classifier`` directory."""

    def __init__(self, directory: str | Path) -> None:
        super().__init__()
        from zoo.classifier import WEIGHTS, load_classifier
        from zoo.eval.extractors import sha256_file

        self.net, self.config = load_classifier(directory)
        self.directory = Path(directory)
        self.num_classes, self.image_size = self.net.num_classes, self.net.image_size
        self.sha256 = sha256_file(self.directory / WEIGHTS)

    def forward(self, images: Tensor) -> Tensor:
        from zoo.classifier import softmax_probabilities, uint8_to_unit

        if tuple(images.shape[-2:]) != (self.image_size, self.image_size):
            raise UserError(f"classifier {self.directory} takes {self.image_size}x{self.image_size} images, the "
                            f"samples are {images.shape[-2]}x{images.shape[-1]}; train one at that size "
                            f"(zoo train-classifier ... --image-size {images.shape[-1]})")
        return softmax_probabilities(self.net(uint8_to_unit(images)))

    def describe(self) -> dict:
        return {"kind": "zoo", "path": str(self.directory.resolve()), "weights_sha256": self.sha256,
                "num_classes": self.num_classes, "image_size": self.image_size,
                "holdout_accuracy": self.config.get("holdout_accuracy"), "data": self.config.get("data")}


def _fit_head(net: nn.Module, state: dict) -> None:
    """Give a timm model the class count of the weights' own head (timm builds 1000 classes: a classifier
    fine-tuned on 9 emoji categories was refused as not matching, so no timm classifier fit a 9-class model)."""
    head = net.get_classifier() if hasattr(net, "get_classifier") else None
    prefix = next((name for name, module in net.named_modules() if module is head and name), None)
    weight = state.get(f"{prefix}.weight") if prefix is not None else None
    if isinstance(weight, Tensor) and weight.ndim >= 1 and weight.shape[0] != getattr(net, "num_classes", None):
        net.reset_classifier(int(weight.shape[0]))


class TimmScorer(Scorer):
    """Any timm classifier from a local weights file, with the model's own resize and normalisation."""

    def __init__(self, name: str, weights: str | None) -> None:
        super().__init__()
        import timm

        from zoo.eval.extractors import sha256_file

        weights = weights and str(Path(weights).expanduser())  # --classifier-weights=~/w.pth: the shell leaves it
        if not weights or not Path(weights).is_file():
            given = f"{weights} does not exist; " if weights else ""
            raise UserError(f"{given}--classifier timm:{name} needs its weights as a local file: pass "
                            f"--classifier-weights FILE (.safetensors or a .pth state dict); nothing is downloaded")
        try:
            self.net = timm.create_model(name, pretrained=False)
        except RuntimeError as err:
            raise UserError(f"--classifier timm:{name}: {str(err).splitlines()[0]} (see timm.list_models())") from None
        path = Path(weights)
        state = _read_state(path)
        _fit_head(self.net, state)
        from zoo.weights import load_state_dict_strict

        load_state_dict_strict(self.net, state, f"--classifier-weights {path} (timm {name})")
        self.net.eval().requires_grad_(False)
        cfg = timm.data.resolve_model_data_config(self.net)
        self.name, self.weights, self.sha256 = name, str(path), sha256_file(path)
        self.num_classes = int(self.net.num_classes)
        self.input_size = int(cfg["input_size"][-1])
        self.crop_pct = float(cfg.get("crop_pct") or 1.0)
        self.mode = cfg.get("interpolation") if cfg.get("interpolation") in ("bilinear", "bicubic", "nearest") \
            else "bicubic"
        self.register_buffer("mean", torch.tensor(cfg["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg["std"]).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        from zoo.classifier import softmax_probabilities

        x = images.float() / 255.0
        resize = math.floor(self.input_size / self.crop_pct)  # timm's eval transform: resize, then centre crop
        if tuple(x.shape[-2:]) != (resize, resize):
            smooth = {} if self.mode == "nearest" else {"antialias": True, "align_corners": False}
            x = F.interpolate(x, size=(resize, resize), mode=self.mode, **smooth).clamp(0, 1)
        top = (resize - self.input_size) // 2
        x = x[..., top:top + self.input_size, top:top + self.input_size]
        return softmax_probabilities(self.net((x - self.mean) / self.std))

    def describe(self) -> dict:
        return {"kind": "timm", "name": self.name, "weights": self.weights, "weights_sha256": self.sha256,
                "num_classes": self.num_classes, "input_size": self.input_size, "crop_pct": self.crop_pct,
                "interpolation": self.mode}


def _read_state(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        from zoo.weights import load_weights

        return load_weights(path)
    from zoo.torchfile import torch_load_plain

    state = torch_load_plain(path, "classifier weights")
    state = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise UserError(f"{path} holds a {type(state).__name__}, not a state dict of tensors")
    return state


def build_scorer(spec: str | None, weights: str | None = None, device: str | torch.device = "cpu") -> Scorer:
    """The classifier ``--classifier`` names (see the module docstring), in eval mode on ``device``."""
    if not spec:
        raise UserError("--distortion needs --classifier: a zoo train-classifier directory (zoo train-classifier "
                        "emoji32 --out DIR) or timm:NAME with --classifier-weights FILE")
    if spec.startswith(TIMM_PREFIX):
        scorer: Scorer = TimmScorer(spec[len(TIMM_PREFIX):], weights)
    else:
        if weights is not None:
            raise UserError("--classifier-weights goes with --classifier timm:NAME; a zoo classifier directory "
                            "holds its own weights")
        scorer = ZooClassifierScorer(spec)
    return scorer.eval().to(device)


def check_classes(scorer: Scorer, classes: int | None, where: str) -> None:
    """The generator must be class-conditional with exactly the classifier's classes."""
    if classes is None:
        raise UserError(f"{where} is unconditional; the distortion analysis scores each sample for its class")
    if classes != scorer.num_classes:
        raise UserError(f"the classifier has {scorer.num_classes} classes but {where} generates {classes}; use a "
                        f"classifier trained on the generator's data")


@torch.no_grad()
def own_class_probabilities(scorer: Callable[[Tensor], Tensor], batches: Iterable[tuple[Tensor, np.ndarray]],
                            threshold: float, device: str | torch.device = "cpu",
                            grid_limit: int = 64) -> tuple[np.ndarray, np.ndarray, Tensor, np.ndarray]:
    """(own-class probability (N,), labels (N,), rejected images (lowest first, <= grid_limit), their indices).

    One pass; only the ``grid_limit`` lowest-scoring rejected images are kept in memory.
    """
    probs, labels, kept, kept_p, kept_i, offset = [], [], None, np.empty(0), np.empty(0, dtype=np.int64), 0
    for images, y in batches:
        if y is None:
            raise UserError("the samples have no labels; the distortion analysis needs class-conditional samples")
        y = np.asarray(y, dtype=np.int64)
        p = scorer(images.to(device)).double().cpu().numpy()
        _check_finite_probabilities(p, offset)
        own = p[np.arange(len(y)), y]
        probs.append(own)
        labels.append(y)
        low = np.flatnonzero(own < threshold)
        if len(low) and grid_limit > 0:
            cand = images[torch.from_numpy(low)].cpu()
            kept = cand if kept is None else torch.cat([kept, cand])
            kept_p, kept_i = np.concatenate([kept_p, own[low]]), np.concatenate([kept_i, low + offset])
            order = np.argsort(kept_p, kind="stable")[:grid_limit]
            kept, kept_p, kept_i = kept[torch.from_numpy(order)], kept_p[order], kept_i[order]
        offset += len(y)
    if not probs:
        raise UserError("no samples to score")
    empty = torch.empty(0, dtype=torch.uint8)
    return np.concatenate(probs), np.concatenate(labels), empty if kept is None else kept, kept_i


def _check_finite_probabilities(p: np.ndarray, offset: int = 0) -> None:
    """Refuse NaN or inf probabilities: ``NaN < threshold`` is False, so every such sample counted as kept and
    a broken classifier reported a distortion of 0."""
    bad = np.flatnonzero(~np.isfinite(p).reshape(len(p), -1).all(axis=1))
    if len(bad):
        raise UserError(f"the classifier gave NaN or inf probabilities for sample {offset + bad[0]} ({len(bad)} of "
                        f"the {len(p)} scored together), so no distortion share can be taken",
                        suggestion="use a classifier whose weights and outputs are finite (train it again with "
                        "zoo train-classifier)")


def distortion_share(own: np.ndarray, labels: np.ndarray, threshold: float, num_classes: int) -> dict:
    """Share of samples with own-class probability below ``threshold``, overall and per class (classes with samples)."""
    own, labels = np.asarray(own, dtype=np.float64), np.asarray(labels, dtype=np.int64)
    _check_finite_probabilities(own)
    rejected = own < threshold
    per_class = {}
    for c in range(num_classes):
        members = labels == c
        if members.any():
            per_class[str(c)] = {"n": int(members.sum()), "rejected": int(rejected[members].sum()),
                                 "share": float(rejected[members].mean()),
                                 "mean_own_probability": float(own[members].mean())}
    return {"threshold": float(threshold), "rule": RULE, "n": int(len(own)), "rejected": int(rejected.sum()),
            "share": float(rejected.mean()) if len(own) else 0.0, "mean_own_probability": float(own.mean()),
            "per_class": per_class}


def check_threshold(threshold: float) -> None:
    """The own-class probability below which a sample counts as distorted: in (0, 1]."""
    if not 0.0 < threshold <= 1.0:  # (nan fails this too)
        raise UserError(f"--threshold must be in (0, 1], got {threshold}")


def analyse(result: dict, scorer: Scorer, threshold: float = 0.5, batch_size: int = 64,
            device: str | torch.device = "cpu", grid_limit: int = 64, log: Callable[[str], None] = print) -> dict:
    """Score the samples of a ``zoo eval`` result; write probabilities, the rejected grid and the updated JSON."""
    from zoo.eval.reference import save_npz, save_text
    from zoo.guards import a_zoo_png
    from zoo.eval.runner import sample_batches
    from zoo.sample import save_grid

    check_threshold(threshold)
    json_path = Path(result["path"])
    stem = json_path.with_suffix("")
    own, labels, rejected_images, rejected_idx = own_class_probabilities(
        scorer, sample_batches(Path(result["samples"]), int(result["n"]), batch_size), threshold, device, grid_limit)
    out = distortion_share(own, labels, threshold, scorer.num_classes)
    save_npz(Path(f"{stem}-own-class-prob.npz"), own_class_probability=own, labels=labels,
             classifier_sha256=np.str_(scorer.describe().get("weights_sha256") or ""))
    grid, grid_path = None, Path(f"{stem}-rejected-p{threshold:g}.png")
    if len(rejected_images):
        grid = save_grid(rejected_images.float() / 255.0, grid_path)
    elif a_zoo_png(grid_path):  # an earlier classifier's rejections beside a result that rejects none
        grid_path.unlink()
    out.update({"classifier": scorer.describe(), "grid": None if grid is None else str(grid),
                "grid_indices": [int(i) for i in rejected_idx], "probabilities": f"{stem}-own-class-prob.npz"})
    result = {k: v for k, v in result.items() if k != "path"}
    result["distortion"] = out
    save_text(json_path, json.dumps(result, indent=2) + "\n")
    result["path"] = str(json_path)
    log(f"zoo eval: distortion {out['share']:.4f} ({out['rejected']}/{out['n']} samples with {RULE}, threshold "
        f"{threshold:g})" + (f"; rejected samples in {grid}" if grid else ""))
    return result

