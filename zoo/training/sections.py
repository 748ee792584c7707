"""Validators of the recipe's ``data`` and ``train`` sections (typos caught with file and line).

    data:
      dataset: synthetic | image_folder | latents | imagenet   # imagenet = latents or image_folder by `latent`
      root: /path/to/data        # image_folder / latents / imagenet
      image_size: 256
      num_classes: 1000
      random_flip: true
      latent: true               # the model works on SD KL-f8 latents
      vae_scale: 0.18215         # latents are multiplied by it unless the shards say they are stored scaled
      vae: /path/to/vae          # local VAE weights (decoding sample grids)
      size: 64                   # synthetic: number of images
      num_workers: 0
    train:
      steps, batch_size, lr, weight_decay, betas, warmup_steps, ema_decay, grad_clip, seed,
      precision (fp32 | bf16), no_weight_decay_1d, ckpt_every, sample_every, log_every, sample_n

Importing this module does not import torch.
"""

from __future__ import annotations

from numbers import Real
from typing import Any

from zoo.errors import did_you_mean
from zoo.recipe import Recipe
from zoo.validate import SECTION_VALIDATORS

DATASETS = ("synthetic", "image_folder", "latents", "imagenet")
DATA_KEYS = ("dataset", "root", "image_size", "num_classes", "random_flip", "latent", "vae_scale", "vae",
             "size", "num_workers", "name")
TRAIN_INTS = ("steps", "batch_size", "warmup_steps", "ckpt_every", "sample_every", "log_every", "seed", "sample_n")
TRAIN_FLOATS = ("lr", "weight_decay", "ema_decay", "grad_clip")
TRAIN_KEYS = TRAIN_INTS + TRAIN_FLOATS + ("betas", "precision", "no_weight_decay_1d")
PRECISIONS = ("fp32", "bf16")


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v: Any) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool)


def _keys(recipe: Recipe, value: dict, allowed: tuple, section: str) -> None:
    for key in value:
        if key not in allowed:
            raise recipe.error((section, key), f"unknown key {key!r} in {section}; its keys are {', '.join(allowed)}",
                               suggestion=did_you_mean(str(key), allowed))


def validate_data(value: dict | None, recipe: Recipe) -> None:
    value = value or {}
    if not isinstance(value, dict):
        raise recipe.error(("data",), f"data must be a mapping, got {value!r}")
    _keys(recipe, value, DATA_KEYS, "data")
    if "dataset" in value and value["dataset"] not in DATASETS:
        raise recipe.error(("data", "dataset"), f"unknown dataset {value['dataset']!r}; choose one of "
                           f"{', '.join(DATASETS)}", suggestion=did_you_mean(str(value["dataset"]), DATASETS))
    for key in ("image_size", "num_classes", "size"):
        if key in value and (not _int(value[key]) or value[key] < 1):
            raise recipe.error(("data", key), f"{key} must be a positive integer, got {value[key]!r}")
    if "num_workers" in value and (not _int(value["num_workers"]) or value["num_workers"] < 0):
        raise recipe.error(("data", "num_workers"), f"num_workers must be an integer >= 0, got {value['num_workers']!r}")
    for key in ("random_flip", "latent"):
        if key in value and not isinstance(value[key], bool):
            raise recipe.error(("data", key), f"{key} must be true or false, got {value[key]!r}")
    if "vae_scale" in value and (not _number(value["vae_scale"]) or value["vae_scale"] <= 0):
        raise recipe.error(("data", "vae_scale"), f"vae_scale must be a positive number, got {value['vae_scale']!r}")
    for key in ("root", "vae"):
        if value.get(key) is not None and not isinstance(value[key], str):
            raise recipe.error(("data", key), f"{key} must be a path, got {value[key]!r}")


def validate_train(value: dict | None, recipe: Recipe) -> None:
    value = value or {}
    if not isinstance(value, dict):
        raise recipe.error(("train",), f"train must be a mapping, got {value!r}")
    _keys(recipe, value, TRAIN_KEYS, "train")
    for key in TRAIN_INTS:
        if key in value and (not _int(value[key]) or value[key] < 0):
            raise recipe.error(("train", key), f"{key} must be an integer >= 0 (0 = never/none), got {value[key]!r}")
    if value.get("batch_size", 1) == 0:
        raise recipe.error(("train", "batch_size"), "batch_size must be at least 1")
    for key in TRAIN_FLOATS:
        if key in value and value[key] is not None and (not _number(value[key]) or value[key] < 0):
            raise recipe.error(("train", key), f"{key} must be a number >= 0, got {value[key]!r}")
    if "ema_decay" in value and value["ema_decay"] > 1:
        raise recipe.error(("train", "ema_decay"), f"ema_decay must be in [0, 1], got {value['ema_decay']!r}")
    betas = value.get("betas", [0.9, 0.999])
    if not (isinstance(betas, list) and len(betas) == 2 and all(_number(b) and 0 <= b < 1 for b in betas)):
        raise recipe.error(("train", "betas"), f"betas must be two numbers in [0, 1), got {betas!r}")
    if value.get("precision", "fp32") not in PRECISIONS:
        raise recipe.error(("train", "precision"), f"precision must be one of {', '.join(PRECISIONS)}, "
                           f"got {value['precision']!r}")
    if "no_weight_decay_1d" in value and not isinstance(value["no_weight_decay_1d"], bool):
        raise recipe.error(("train", "no_weight_decay_1d"), "no_weight_decay_1d must be true or false")


SECTION_VALIDATORS["data"] = validate_data
SECTION_VALIDATORS["train"] = validate_train
