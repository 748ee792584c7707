"""A small ConvNeXt image classifier built from zoo's registered parts, and its checkpoint directory.

It scores generated samples for the distortion analysis (``zoo eval --distortion``): the share of
samples a classifier does not recognise as their own (conditioning) class. The network is a
patchify stem (k×k conv, stride k), ``convnext`` blocks (the registry's block, ``standard``
variant, with a plain ``layernorm`` conditioner: no time enters a classifier) at one or more
resolutions joined by LayerNorm + 2×2 stride-2 convs, global average pooling, LayerNorm and a
linear head, as in ConvNeXt (Liu et al. 2022).

A saved classifier is a directory written crash-safely (:func:`zoo.atomic.write_dir`):
``model.safetensors`` and ``config.json`` (architecture, classes, image size, the data it was
trained on and its holdout accuracy); :func:`load_classifier` rebuilds it strictly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.errors import UserError, some_of
from zoo.modes import evaluating

CONFIG, WEIGHTS = "config.json", "model.safetensors"
KIND = "zoo-classifier"
FORMAT = 1


class _Downsample(nn.Module):
    """LayerNorm over channels, then a 2×2 stride-2 conv (ConvNeXt's stage transition), NHWC in and out."""

    def __init__(self, dim_in: int, dim_out: int, norm: type) -> None:
        super().__init__()
        self.norm = norm(dim_in)
        self.conv = nn.Conv2d(dim_in, dim_out, 2, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        h, _ = self.norm(x)
        return self.conv(h.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class ConvNeXtClassifier(nn.Module):
    """Images in [-1, 1] (B, C, H, W) -> class logits (B, num_classes).

    ``dims``/``depths``: channels and ``convnext`` blocks per resolution (one stage per entry,
    each after the first at half the previous resolution); ``stem``: the patchify stride.
    """

    def __init__(self, num_classes: int, in_channels: int = 3, image_size: int = 32, dims: Sequence[int] = (32, 64),
                 depths: Sequence[int] = (2, 2), stem: int = 2, kernel_size: int = 7, mlp_ratio: float = 4.0,
                 norm: str = "layernorm") -> None:
        super().__init__()
        from zoo import registry

        if len(dims) != len(depths) or not dims:
            raise UserError(f"classifier dims {list(dims)} and depths {list(depths)} need one entry per stage each")
        if num_classes < 2:
            raise UserError(f"a classifier needs at least 2 classes, got {num_classes}")
        reduction = stem * 2 ** (len(dims) - 1)
        if image_size % reduction:
            raise UserError(f"image size {image_size} is not divisible by the classifier's reduction {reduction} "
                            f"(stem {stem} x 2^{len(dims) - 1} stages); use fewer stages or a smaller stem")
        block, norm_cls = registry.get("block", "convnext"), registry.get("conditioner", norm)
        self.config = {"num_classes": int(num_classes), "in_channels": int(in_channels), "image_size": int(image_size),
                       "dims": [int(d) for d in dims], "depths": [int(d) for d in depths], "stem": int(stem),
                       "kernel_size": int(kernel_size), "mlp_ratio": float(mlp_ratio), "norm": norm}
        self.num_classes, self.image_size = int(num_classes), int(image_size)
        self.stem = nn.Conv2d(in_channels, dims[0], stem, stride=stem)
        self.stem_norm = norm_cls(dims[0])
        self.stages = nn.ModuleList()
        for i, (dim, depth) in enumerate(zip(dims, depths)):
            layers: list[nn.Module] = [] if i == 0 else [_Downsample(dims[i - 1], dim, norm_cls)]
            layers += [block(dim, kernel_size=kernel_size, mlp_ratio=mlp_ratio, norm=norm_cls, variant="standard",
                             layer_scale_init=1e-6) for _ in range(depth)]
            self.stages.append(nn.ModuleList(layers))
        self.head_norm = nn.LayerNorm(dims[-1])
        self.head = nn.Linear(dims[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h, _ = self.stem_norm(self.stem(x).permute(0, 2, 3, 1))  # NHWC from here on, as the blocks take it
        for stage in self.stages:
            for layer in stage:
                h = layer(h) if isinstance(layer, _Downsample) else layer(h, None)
        return self.head(self.head_norm(h.mean(dim=(1, 2))))


def check_out(directory: str | Path, replace: bool = True) -> Path:
    """``directory`` if a classifier may be written there: new, empty, or a zoo classifier (replaced whole,
    only where ``replace``: ``zoo train-classifier --force``)."""
    from zoo import atomic
    from zoo.guards import check_writable

    directory = Path(directory).expanduser()
    if directory.exists() and not directory.is_dir():
        raise UserError(f"--out {directory} is a file; give a directory for the classifier")
    check_writable(directory)  # before the steps are spent: it is written beside itself, then renamed
    if directory.is_dir() and any(directory.iterdir()):
        record = atomic.read_record(directory, CONFIG) or {}
        if record.get("kind") != KIND:
            raise UserError(f"--out {directory} holds files that are not a zoo classifier; choose a new directory")
        added = atomic.unlisted_files(directory, CONFIG)
        if added:  # replacing the directory would delete them
            raise UserError(f"--out {directory} is a zoo classifier that also holds files zoo did not write "
                            f"({some_of(added)}); zoo will not replace it",
                            suggestion="move them away or choose another --out")
        if not replace:
            accuracy = record.get("holdout_accuracy")
            what = f" (holdout accuracy {accuracy:.4f})" if isinstance(accuracy, float) else ""
            raise UserError(f"--out {directory} is already a zoo classifier{what}",
                            suggestion="pass --force to replace it, or choose another --out")
    return directory


def save_classifier(directory: str | Path, model: ConvNeXtClassifier, info: Mapping[str, Any]) -> Path:
    """Write ``model.safetensors`` + ``config.json`` (architecture and ``info``) crash-safely; return the directory."""
    from safetensors.torch import save_file

    from zoo import atomic

    directory = check_out(directory)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    payload = {"kind": KIND, "format": FORMAT, "arch": model.config, **info}
    json.dumps(payload)
    return atomic.write_dir(directory, lambda tmp: save_file(state, str(tmp / WEIGHTS)), CONFIG, payload)


def read_classifier_config(directory: str | Path) -> dict:
    """The ``config.json`` of a saved classifier, checked to be a complete zoo classifier directory."""
    from zoo import atomic

    directory = Path(directory).expanduser()  # --classifier=~/x: the shell leaves that ~ to us
    atomic.repair(directory, CONFIG)  # first: a replacement a kill interrupted leaves only DIR.old-*/DIR.tmp-*
    if directory.exists() and not directory.is_dir():
        raise UserError(f"classifier {directory} is a file; a classifier is the directory `zoo train-classifier "
                        f"--out DIR` writes (its config.json and model.safetensors): give that directory")
    if not directory.is_dir():
        raise UserError(f"classifier directory {directory} does not exist; train one with "
                        f"`zoo train-classifier emoji32 --out {directory}`")
    payload = atomic.read_record(directory, CONFIG)
    if payload is None or payload.get("kind") != KIND:
        raise UserError(f"{directory} is not a zoo classifier (no {CONFIG} of kind {KIND}); "
                        f"train one with `zoo train-classifier`")
    problems = atomic.missing_or_truncated(directory, CONFIG)
    if problems:
        raise UserError(f"classifier {directory} is incomplete: {'; '.join(problems)}")
    return payload


def load_classifier(directory: str | Path, device: str | torch.device = "cpu") -> tuple[ConvNeXtClassifier, dict]:
    """A saved classifier in eval mode on ``device`` (weights loaded strictly, and finite: NaN weights score
    every sample NaN) and its config."""
    from zoo.weights import check_finite, load_state_dict_strict, load_weights

    payload = read_classifier_config(directory)
    model = ConvNeXtClassifier(**payload["arch"])
    path = Path(directory).expanduser() / WEIGHTS
    state = load_weights(path)
    check_finite(state, str(path), suggestion="train the classifier again (zoo train-classifier)")
    load_state_dict_strict(model, state, str(path))
    return model.eval().requires_grad_(False).to(device), payload


def uint8_to_unit(images: Tensor) -> Tensor:
    """uint8 images (the sample shards) -> float in [-1, 1] (the training data's range)."""
    return images.float() / 127.5 - 1.0


@torch.no_grad()
def accuracy(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` on float images in [-1, 1] (no augmentation); the model's mode is restored."""
    with evaluating(model):
        device = next(model.parameters()).device
        correct = sum(int((model(images[i:i + batch_size].to(device)).argmax(1).cpu() == labels[i:i + batch_size])
                          .sum()) for i in range(0, len(images), batch_size))
    return correct / max(1, len(images))


def softmax_probabilities(logits: Tensor) -> Tensor:
    """Class probabilities from logits, in float64 (the threshold comparison should not depend on float32 rounding)."""
    return F.softmax(logits.double(), dim=-1)
