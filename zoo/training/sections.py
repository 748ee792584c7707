"""Validators of the recipe's ``data`` and ``train`` sections (typos caught with file and line).

    data:
      dataset: synthetic | image_folder | latents | imagenet | emoji32   # registered; imagenet = latents or image_folder by `latent`
      root: /path/to/data        # image_folder / latents / imagenet
      image_size: 256
      num_classes: 1000
      random_flip: true
      latent: true               # the model works on SD KL-f8 latents
      vae_scale: 0.18215         # latents are multiplied by it unless the shards say they are stored scaled
      vae: /path/to/vae          # local VAE weights (decoding sample grids)
      vae_file: autoencoder_kl.pth   # which file of a VAE folder holding several (default: its one *ema* file)
      size: 64                   # synthetic: number of images
      num_workers: 0
      split: train               # emoji32: train | holdout
      cache: ~/.cache/zoo        # emoji32: where the built images are cached (else $ZOO_CACHE, $XDG_CACHE_HOME/zoo)
    train:
      steps, batch_size, lr, lr_schedule (constant | cosine | linear), min_lr, weight_decay, betas, warmup_steps, ema_decay, grad_clip, seed,
      precision (fp32 | bf16 | fp16), no_weight_decay_1d, ckpt_every, sample_every, log_every, sample_n,
      grad_accum, grad_checkpointing, compile, tf32, keep_last, parallel (ddp | fsdp)
      init_from: RUN/last                            # a new run from a checkpoint's (EMA) weights
      eval_every, eval_n, eval_extractor, eval_ref   # a small FD every eval_every steps (zoo.training.eval_hook)
      val_every, val_n                               # a fixed-draw held-out loss every val_every steps (zoo.training.val_loss)

Importing this module does not import torch.
"""

from __future__ import annotations

from typing import Annotated, Any, Mapping

from zoo.domains import (MAX_BATCH, MAX_COUNT, MAX_STEPS, MAX_WORKERS, Classes, Decay, Doc, ImageSize, NonNegative, OneOf,
                         Positive, PositiveFloat, Range)
from zoo import registry
from zoo.recipe import Recipe
from zoo.validate import check_table, register_section

DATASETS = registry.Names("dataset")  # synthetic, image_folder, latents, imagenet, emoji32 and plugins
EXTRACTORS = registry.Names("extractor")  # efficientnet_lite0, inception and plugins
PRECISIONS = ("fp32", "bf16", "fp16")
PARALLEL = ("ddp", "fsdp")
Path = Annotated[str, Doc("a path")]  # the Doc of a str is what it must be: "root must be a path", so a noun
Every = Annotated[int, Range(0, MAX_STEPS), Doc("0 = never")]

#: The ``data`` section: key → type and domain (a new key is one line).
DATA: dict[str, Any] = {
    "dataset": Annotated[str, OneOf(DATASETS, "dataset")],
    "root": Path | None,
    "image_size": ImageSize,
    "num_classes": Classes | None,  # null: as left out (an unconditional model)
    "random_flip": bool,
    "latent": bool,
    "vae_scale": PositiveFloat,
    "vae": Path | None,
    "vae_file": Annotated[str, Doc("a file name in the VAE folder: the weights to decode with where it holds "
                                   "several (unset: its one *ema* file)")] | None,
    "size": Annotated[int, Range(1, MAX_COUNT), Doc("synthetic: number of images")],
    "num_workers": Annotated[int, Range(0, MAX_WORKERS)],
    "split": Annotated[str, OneOf(("train", "holdout"), "split"), Doc("emoji32: train or holdout")],
    "cache": Path | None,
}

#: What the datasets and the trainer read for ``data`` keys a recipe leaves out: a resume that spells one
#: out (``random_flip: false``) changes nothing, and its note must not say ``None -> False``.
DATA_UNSET_MEANS: dict[str, Any] = {"dataset": "synthetic", "random_flip": False, "latent": False,
                                    "vae_scale": 0.18215, "num_workers": 0, "split": "train"}


def data_setting(data: Mapping[str, Any], key: str) -> Any:
    """The ``data`` section's ``key``, or what its absence means (``DATA_UNSET_MEANS``): one place for defaults."""
    value = data.get(key)
    return DATA_UNSET_MEANS.get(key) if value is None else value

LR_SCHEDULES = ("constant", "cosine", "linear")

#: What ``zoo train`` reads for ``train`` keys a recipe leaves out.
TRAIN_DEFAULTS: dict[str, Any] = {
    "lr": 1e-4, "batch_size": 32, "steps": 0, "weight_decay": 0.0, "ema_decay": 0.9999, "seed": 0,
    "precision": "fp32", "ckpt_every": 0, "sample_every": 0, "log_every": 100, "sample_n": 16,
    "grad_accum": 1, "grad_checkpointing": False, "compile": False, "tf32": True, "keep_last": 0,
    "parallel": "ddp"}

#: What the optimizer and schedule read for ``train`` keys a recipe leaves out: a resume that spells one out
#: (``lr_schedule: constant``) changes nothing, and its note must not say ``None -> 'constant'``.
UNSET_MEANS: dict[str, Any] = {"lr_schedule": "constant", "min_lr": 0.0, "warmup_steps": 0, "betas": [0.9, 0.999],
                               "no_weight_decay_1d": False, "grad_clip": None, "val_every": 0, "val_n": 1024,
                               "eval_every": 0, "eval_n": 256, "eval_ref": None,
                               "eval_extractor": "efficientnet_lite0",  # offline: its weights come with a dependency
                               "init_from": None}

#: The ``train`` section: key → type and domain (a new key is one line).
TRAIN: dict[str, Any] = {
    "steps": Annotated[int, Range(0, MAX_STEPS)],
    "batch_size": Annotated[int, Range(1, MAX_BATCH)],
    "lr": PositiveFloat,
    "lr_schedule": Annotated[str, OneOf(LR_SCHEDULES, "lr schedule"),
                             Doc("after warm-up: constant (default), or cosine/linear decay to min_lr at `steps`")],
    "min_lr": Annotated[float, NonNegative, Doc("where cosine/linear decay ends (default 0)")],
    "weight_decay": Annotated[float, NonNegative],
    "betas": tuple[Annotated[float, Decay], Annotated[float, Decay]],
    "warmup_steps": Annotated[int, Range(0, MAX_STEPS)],
    "ema_decay": Annotated[float, Decay],
    "grad_clip": Annotated[float, Positive, Doc("max gradient norm; null = no clipping")] | None,
    "seed": Annotated[int, Range(0, 2**56 - 1)],  # per-sample seeds keep 56 bits: a larger one repeats a smaller one
    "precision": Annotated[str, OneOf(PRECISIONS, "precision")],
    "no_weight_decay_1d": bool,
    "ckpt_every": Every,
    "sample_every": Every,
    "eval_every": Annotated[int, Range(0, MAX_STEPS), Doc("steps between small FDs of the EMA model (zoo.eval.quick_fd); 0 = never")],
    "eval_n": Annotated[int, Range(2, MAX_COUNT), Doc("samples per eval_every FD (default 256)")],
    "eval_extractor": Annotated[str, OneOf(EXTRACTORS, "extractor"),
                                Doc("eval_every features (default efficientnet_lite0)")],
    "eval_ref": Annotated[str, Doc("a reference for the eval_every FDs (an .npz, an image folder or "
                                   "dataset[:split])")] | None,
    "val_every": Annotated[int, Range(0, MAX_STEPS),
                           Doc("steps between validation losses of the EMA model (zoo.training.val_loss); 0 = never")],
    "val_n": Annotated[int, Range(1, MAX_COUNT), Doc("(image, time, noise) triples per validation loss (default 1024)")],
    "log_every": Every,
    "sample_n": Annotated[int, Range(1, MAX_BATCH), Doc("images per sample grid")],
    "grad_accum": Annotated[int, Range(1, MAX_BATCH), Doc("micro-batches per step; the global batch stays batch_size")],
    "grad_checkpointing": Annotated[bool, Doc("recompute block activations in backward")],
    "compile": Annotated[bool, Doc("torch.compile the model")],
    "tf32": Annotated[bool, Doc("TF32 matmuls on CUDA (default true)")],
    "keep_last": Annotated[int, Range(0, MAX_STEPS), Doc("keep the newest K step_* directories; 0 = all")],
    "init_from": Annotated[str, Doc("a checkpoint whose (EMA) weights a new run starts from (fine-tuning)")] | None,
    "parallel": Annotated[str, OneOf(PARALLEL, "parallel"), Doc("under torchrun: ddp or fsdp")],
}


def validate_train(value: dict | None, recipe: Recipe) -> None:
    """The ``train`` table, then the rule between its keys: a decay ends at or below where it starts."""
    check_table(recipe, value, TRAIN, ("train",), "train")
    value = value or {}
    lr, floor = value.get("lr", TRAIN_DEFAULTS["lr"]), value.get("min_lr", 0.0)
    if value.get("lr_schedule", "constant") != "constant" and floor > lr:
        raise recipe.error(("train", "min_lr"), f"min_lr {floor:g} is above lr {lr:g}: the {value['lr_schedule']} "
                           "'decay' would raise the learning rate to min_lr by the last step",
                           suggestion=f"set train.min_lr below {lr:g} (e.g. {lr / 100:g})")


register_section("data", DATA)
register_section("train", TRAIN, validate_train)
