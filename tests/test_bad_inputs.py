"""A corpus of bad inputs: each is one line on stderr naming the culprit, exit 2, no traceback, nothing lost.

Every row of :data:`CASES` is one case: ``(id, argv, setup, code, expected)``.

- ``argv``: the command line after ``zoo``, split on spaces before ``{tmp}`` (the case's own empty
  directory) and ``{recipes}`` (this folder's ``recipes/``) are filled in, so a path may hold spaces.
- ``setup``: names a function in :data:`SETUPS` that writes the bad input into ``{tmp}`` first
  (``ckpt`` = a good checkpoint at ``{tmp}/ckpt``; ``-`` = nothing).
- ``code``: the exit status (2: a user mistake).
- ``expected``: a substring of the error line (with the same placeholders), naming the culprit.

Each case checks: the exit status; exactly one ``error:`` line, no traceback, never PyTorch's
``weights_only=False`` advice; every file that existed before is unchanged (size, mtime,
bytes) and nothing new appears outside ``{tmp}/out*`` (the command's own output); the time
stays under :data:`TIME_LIMIT_S`. A few cases also run as a real ``python -m zoo`` process.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import zoo
from zoo import checkpoint as ckpt
from zoo.cli import main

HERE = Path(__file__).parent
RECIPES = HERE / "recipes"
TRAIN = "{recipes}/tiny_train.yaml"
LATENT_RECIPE = "{recipes}/tiny_dit_latent.yaml"
FAST = "--set train.steps=2 --set train.batch_size=2 --set train.sample_every=0 --set train.ckpt_every=0"
LATENT = f"--set model.in_channels=4 --set data.dataset=latents --set data.root={{tmp}}/latents {FAST}"
IMAGES = f"--set data.dataset=image_folder --set data.root={{tmp}}/images {FAST}"
TIME_LIMIT_S = 60.0  # a generous bound on a loaded 2-core machine; a hang or a huge allocation exceeds it
NO_GPU = not torch.cuda.is_available()

# (id, argv, setup, code, expected substring of the error line)
CASES = [
    # -- build / list: recipes and their values
    ("build-missing-recipe", "build {tmp}/nope.yaml", "-", 2, "{tmp}/nope.yaml"),
    ("build-path-named-like-a-shipped-recipe", "build nowhere/dit_s_2.yaml", "-", 2,
     "recipe file not found: nowhere/dit_s_2.yaml"),
    ("build-recipe-is-dir", "build {tmp}", "-", 2, "{tmp}"),
    ("build-mlp-ratio-rounds-to-zero", "build dit_s_2 --set model.mlp_ratio=0.001", "-", 2,
     "mlp_ratio 0.001 gives a block of width 384 an MLP of 0 features (use mlp_ratio >= 0.0026)"),
    ("build-broken-yaml", "build {tmp}/r.yaml", "yaml_broken", 2, "{tmp}/r.yaml:2"),
    ("build-binary-recipe", "build {tmp}/r.yaml", "yaml_binary", 2, "{tmp}/r.yaml"),
    ("build-empty-recipe", "build {tmp}/r.yaml", "yaml_empty", 2, "{tmp}/r.yaml"),
    ("build-recipe-is-a-list", "build {tmp}/r.yaml", "yaml_list", 2, "{tmp}/r.yaml"),
    ("build-typo", f"build {TRAIN} --set model.depht=3", "-", 2, "did you mean depth?"),
    ("build-unknown-block", f"build {TRAIN} --set model.type=ditt", "-", 2, "ditt"),
    ("build-bad-override-syntax", f"build {TRAIN} --set model.depth", "-", 2, "model.depth"),
    ("build-override-wrong-type", f"build {TRAIN} --set model.depth=abc", "-", 2, "model.depth"),
    ("build-depth-zero", f"build {TRAIN} --set model.depth=0", "-", 2, "model.depth"),
    ("build-depth-huge", f"build {TRAIN} --set model.depth=1000000000000", "-", 2, "model.depth"),
    ("build-heads-not-dividing", f"build {TRAIN} --set model.num_heads=3", "-", 2, "num_heads"),
    # pixel ImageNet and image folders load RGB at data.image_size: refused by build, not at zoo train's first image
    ("build-imagenet-pixels-other-size", "build dimr_m_3r --set model.input_size=48", "-", 2,
     "key data.image_size: data.image_size is 64, but the model takes 48x48 images (set data.image_size to 48"),
    ("build-imagenet-pixels-one-channel", "build dimr_m_3r --set model.in_channels=1", "-", 2,
     "key data: image folders give RGB images, but the model takes 1 input channels"),
    ("build-image-folder-other-size", f"build {TRAIN} --set data.dataset=image_folder --set data.root={{tmp}} "
     "--set data.image_size=16", "-", 2, "data.image_size is 16, but the model takes 8x8 images"),
    # the --set under a file's mapping is named, not the line of the mapping ('dimr_m_3r.yaml:9: key ...block')
    ("build-nested-heads-not-dividing", "build dimr_m_3r --set model.branches.0.block.num_heads=7", "-", 2,
     "--set model.branches.0.block.num_heads=7: key model.branches.0.block.num_heads: dim=768 must be divisible"),
    ("build-nan-lr", f"build {TRAIN} --set train.lr=.nan", "-", 2, "train.lr"),
    ("build-negative-lr", f"build {TRAIN} --set train.lr=-1", "-", 2, "train.lr"),
    ("build-ema-decay-one", f"build {TRAIN} --set train.ema_decay=1.5", "-", 2, "train.ema_decay"),
    ("build-alias-bomb", "build {tmp}/r.yaml", "yaml_alias_bomb", 2, "{tmp}/r.yaml"),
    ("build-deep-nesting", "build {tmp}/r.yaml", "yaml_deep", 2, "{tmp}/r.yaml"),
    ("build-set-index-out-of-range", f"build {TRAIN} --set train.betas.5=0.9", "-", 2, "train.betas"),
    ("build-bad-device", f"build {TRAIN} --device gpu", "-", 2, "invalid choice"),
    ("build-base-missing", "build {tmp}/r.yaml", "yaml_missing_base", 2, "{tmp}/r.yaml"),
    ("list-unknown-kind", "list blok", "-", 2, "blok"),
    # -- parity: golden files
    ("parity-missing", "parity {tmp}/golden.pt", "-", 2, "{tmp}/golden.pt"),
    ("parity-garbage", "parity {tmp}/golden.pt", "golden_garbage", 2, "{tmp}/golden.pt"),
    ("parity-hostile-pickle", "parity {tmp}/golden.pt", "golden_hostile", 2,
     "golden.pt: it holds a pickled Python object"),
    ("parity-not-golden", "parity {tmp}/golden.pt", "golden_plain", 2, "{tmp}/golden.pt"),
    ("parity-on-a-checkpoint-dir", "parity {tmp}/ckpt", "ckpt", 2, "{tmp}/ckpt"),
    ("parity-truncated", "parity {tmp}/golden.pt", "golden_truncated", 2, "{tmp}/golden.pt"),
    # -- convert: official checkpoints and --out
    ("convert-unknown-family", f"convert ditt {{tmp}}/official.pt --recipe {TRAIN} --out {{tmp}}/out", "official",
     2, "ditt"),
    ("convert-missing-checkpoint", f"convert dit {{tmp}}/none.pt --recipe {TRAIN} --out {{tmp}}/out", "-", 2,
     "{tmp}/none.pt"),
    ("convert-garbage-checkpoint", f"convert dit {{tmp}}/official.pt --recipe {TRAIN} --out {{tmp}}/out",
     "official_garbage", 2, "{tmp}/official.pt"),
    ("convert-hostile-pickle", f"convert dit {{tmp}}/official.pt --recipe {TRAIN} --out {{tmp}}/out",
     "official_hostile", 2, "{tmp}/official.pt: it holds a pickled Python object"),
    ("convert-truncated-checkpoint", f"convert dit {{tmp}}/official.pt --recipe {TRAIN} --out {{tmp}}/out",
     "official_truncated", 2, "{tmp}/official.pt"),
    ("convert-wrong-weights", f"convert dit {{tmp}}/official.pt --recipe {TRAIN} --out {{tmp}}/out",
     "official_wrong_keys", 2, "does not match the model"),
    ("convert-out-is-a-file", f"convert dit {{tmp}}/official.pt --recipe {TRAIN} --out {{tmp}}/out",
     "official+out_file", 2, "--out {tmp}/out exists and is not a directory"),
    ("convert-out-is-a-user-dir", f"convert dit {{tmp}}/official.pt --recipe {TRAIN} --out {{tmp}}/out",
     "official+out_user_dir", 2, "--out {tmp}/out exists and is not a zoo checkpoint"),
    ("convert-force-on-a-user-dir", f"convert dit {{tmp}}/official.pt --recipe {TRAIN} --out {{tmp}}/out --force",
     "official+out_user_dir", 2, "--out {tmp}/out exists and is not a zoo checkpoint"),
    ("convert-out-is-a-checkpoint", f"convert dit {{tmp}}/official.pt --recipe {TRAIN} --out {{tmp}}/ckpt",
     "official+ckpt", 2, "pass --force"),
    ("convert-force-on-a-checkpoint-with-user-files",
     f"convert dit {{tmp}}/official.pt --recipe {TRAIN} --out {{tmp}}/ckpt --force", "official+ckpt_user_file", 2,
     "notes.txt"),
    ("convert-out-under-a-file", f"convert dit {{tmp}}/official.pt --recipe {TRAIN} --out {{tmp}}/out/sub",
     "official+out_file", 2, "{tmp}/out is a file"),
    ("convert-missing-recipe", "convert dit {tmp}/official.pt --recipe {tmp}/r.yaml --out {tmp}/out", "official",
     2, "{tmp}/r.yaml"),
    ("convert-missing-config", f"convert dit {{tmp}}/official.pt --recipe {TRAIN} --out {{tmp}}/out "
     "--config {tmp}/c.json", "official", 2, "{tmp}/c.json"),
    ("convert-invalid-config", f"convert dit {{tmp}}/official.pt --recipe {TRAIN} --out {{tmp}}/out "
     "--config {tmp}/c.json", "official+json_broken", 2, "{tmp}/c.json"),
    # -- sample: sources, checkpoints, outputs, devices
    ("sample-missing-path", "sample {tmp}/runs/dit_s_2 --out {tmp}/out.png", "-", 2,
     "{tmp}/runs/dit_s_2 does not exist"),  # --out: the default samples.png is checked in the current directory
    ("sample-path-named-like-a-shipped-recipe", "sample nowhere/dit_s_2 --out {tmp}/out.png", "-", 2,
     "nowhere/dit_s_2 does not exist"),
    ("sample-missing-recipe-file", "sample {tmp}/dit_s_2.yaml --out {tmp}/out.png", "-", 2, "{tmp}/dit_s_2.yaml"),
    ("sample-a-weights-file", "sample {tmp}/model.safetensors --out {tmp}/out.png", "weights_file", 2,
     "zoo convert"),
    ("sample-dir-not-a-checkpoint", "sample {tmp}/out_user --out {tmp}/out.png", "user_dir", 2,
     "{tmp}/out_user is not a zoo checkpoint"),
    ("sample-ckpt-missing-model", "sample {tmp}/ckpt --out {tmp}/out.png", "ckpt_no_model", 2,
     "model.safetensors is missing"),
    ("sample-ckpt-truncated-weights", "sample {tmp}/ckpt --out {tmp}/out.png", "ckpt_truncated_ema", 2,
     "ema.safetensors has 64 bytes"),
    ("sample-ckpt-garbage-weights", "sample {tmp}/ckpt --out {tmp}/out.png", "ckpt_garbage_ema", 2,
     "{tmp}/ckpt/ema.safetensors"),
    ("sample-ckpt-invalid-json", "sample {tmp}/ckpt --out {tmp}/out.png", "ckpt_json_broken", 2,
     "{tmp}/ckpt/config.json is not valid JSON"),
    ("sample-ckpt-json-not-a-config", "sample {tmp}/ckpt --out {tmp}/out.png", "ckpt_json_list", 2,
     "{tmp}/ckpt/config.json"),
    ("sample-ckpt-bad-recipe", "sample {tmp}/ckpt --out {tmp}/out.png", "ckpt_json_bad_recipe", 2,
     "{tmp}/ckpt/config.json"),
    ("sample-ckpt-wrong-shapes", "sample {tmp}/ckpt --out {tmp}/out.png", "ckpt_json_other_model", 2,
     "(the model section of {tmp}/ckpt/config.json does not describe these weights"),
    ("sample-ckpt-no-model-section", "sample {tmp}/ckpt --out {tmp}/out.png", "ckpt_json_no_model_section", 2,
     "{tmp}/ckpt/config.json: its recipe has no model section"),
    ("sample-out-is-a-dir", "sample {tmp}/ckpt --out {tmp}", "ckpt", 2, "is a directory"),
    ("sample-out-not-png", "sample {tmp}/ckpt --out {tmp}/out.jpg", "ckpt", 2, "{tmp}/out.jpg"),
    ("sample-out-would-replace-a-user-file", "sample {tmp}/ckpt --out {tmp}/out.png", "ckpt+out_png_not_png", 2,
     "{tmp}/out.png exists and is not a PNG"),
    ("sample-out-would-replace-a-users-png", "sample {tmp}/ckpt --out {tmp}/out.png", "ckpt+out_png_of_a_user", 2,
     "{tmp}/out.png exists and is a PNG zoo did not write"),
    ("sample-unknown-device", "sample {tmp}/ckpt --out {tmp}/out.png --device gpu", "ckpt", 2, "--device 'gpu'"),
    ("sample-meta-device", "sample {tmp}/ckpt --out {tmp}/out.png --device meta", "ckpt", 2, "--device 'meta'"),
    pytest.param("sample-cuda-without-gpu", "sample {tmp}/ckpt --out {tmp}/out.png --device cuda", "ckpt", 2,
                 "no CUDA GPU", marks=pytest.mark.skipif(not NO_GPU, reason="this machine has a GPU")),
    ("sample-class-out-of-range", "sample {tmp}/ckpt --out {tmp}/out.png --class 99", "ckpt", 2, "class label 99 (--class)"),
    ("sample-zero-images", "sample {tmp}/ckpt --out {tmp}/out.png --n 0", "ckpt", 2, "--n"),
    ("sample-unknown-label-draw", "sample {tmp}/ckpt --out {tmp}/out.png --set sample.labels=balnced", "ckpt", 2,
     "got 'balnced' (did you mean balanced?)"),
    ("sample-unknown-solver", "sample {tmp}/ckpt --out {tmp}/out.png --solver eulr", "ckpt", 2, "eulr"),
    ("sample-model-override-on-checkpoint", "sample {tmp}/ckpt --out {tmp}/out.png --set model.depth=3", "ckpt",
     2, "model section is fixed"),
    ("sample-trained-diffusion-override-on-checkpoint", "sample {tmp}/ckpt --out {tmp}/out.png "
     "--set diffusion.null_label=7", "ckpt", 2, "--set diffusion.null_label would change what its weights were trained"),
    ("sample-schedule-override-on-checkpoint", "sample {tmp}/ckpt --out {tmp}/out.png "
     "--set diffusion.schedule.num_steps=500", "ckpt", 2, "--set diffusion.schedule would change"),
    ("sample-missing-vae", f"sample {LATENT_RECIPE} --out {{tmp}}/out.png --n 1 --vae {{tmp}}/vae", "-", 2,
     "VAE directory {tmp}/vae does not exist"),
    ("sample-garbage-vae", f"sample {LATENT_RECIPE} --out {{tmp}}/out.png --n 1 --vae {{tmp}}/vae.safetensors",
     "vae_garbage", 2, "{tmp}/vae.safetensors"),
    ("sample-hostile-vae", f"sample {LATENT_RECIPE} --out {{tmp}}/out.png --n 1 --vae {{tmp}}/vae.pth",
     "vae_hostile", 2, "{tmp}/vae.pth: it holds a pickled Python object"),
    # -- compare / eval
    ("compare-unknown-device", f"compare {TRAIN} --no-time --device gpu", "-", 2, "--device 'gpu'"),
    ("compare-missing-recipe", "compare {tmp}/none.yaml --no-time", "-", 2, "{tmp}/none.yaml"),
    ("compare-plot-onto-a-dir", f"compare {TRAIN} --no-time --plot {{tmp}}", "-", 2, "{tmp} is a directory"),
    ("eval-missing-source", "eval {tmp}/none --n 4", "-", 2, "{tmp}/none"),
    # it said 'its last/ is evaluated': a step_*/ saved after last/ is the one read
    ("eval-missing-source-fix", "eval {tmp}/none --n 4", "-", 2, "(pass a run directory (its newest checkpoint is "
     "evaluated: last/, or a step_*/ saved after it) or a checkpoint directory)"),
    ("eval-unknown-device", "eval {tmp}/ckpt --n 4 --device gpu", "ckpt", 2, "--device 'gpu'"),
    ("eval-too-few-samples", "eval {tmp}/ckpt --n 1", "ckpt", 2, "--n"),
    ("eval-unknown-label-draw", "eval {tmp}/ckpt --n 4 --set sample.labels=balnced", "ckpt", 2,
     "key sample.labels: labels must be one of random, balanced"),
    ("eval-too-many-samples", "eval {tmp}/ckpt --n 99999999999999999999", "ckpt", 2,
     "--n must be at least 2 and at most 100,000,000"),  # it was numpy's traceback
    ("eval-out-is-a-file", "eval {tmp}/ckpt --n 4 --out {tmp}/out", "ckpt+out_file", 2,
     "--out {tmp}/out is a file; zoo eval writes"),
    ("eval-out-under-a-file", "eval {tmp}/ckpt --n 4 --out {tmp}/out/sub", "ckpt+out_file", 2,
     "{tmp}/out is a file, not a directory"),
    ("eval-a-user-dir", "eval {tmp}/out_user --n 4", "user_dir", 2, "{tmp}/out_user"),
    ("eval-distortion-missing-classifier", "eval {tmp}/ckpt --n 4 --distortion --classifier {tmp}/none", "ckpt", 2,
     "classifier directory {tmp}/none does not exist"),
    ("train-classifier-unknown-data", "train-classifier nodata --out {tmp}/out", "-", 2,
     "nodata is neither a recipe file nor a registered dataset"),
    ("prepare-latents-unknown-device", "prepare-latents {tmp} --vae {tmp} --out {tmp}/out --device gpu", "-", 2,
     "--device 'gpu'"),
    # each hung (a 20000 px crop of every image, forking workers without end) or was an OverflowError traceback
    ("prepare-latents-huge-resolution", "prepare-latents {tmp} --vae {tmp} --out {tmp}/out --resolution 20000", "-", 2,
     "--resolution must be >= 1 and at most 16,384 (as data.image_size), got 20000"),
    ("prepare-latents-overflowing-resolution", "prepare-latents {tmp} --vae {tmp} --out {tmp}/out "
     "--resolution 99999999999999999998", "-", 2, "--resolution must be >= 1 and at most 16,384"),
    # 'the model' read as the diffusion model, and no fix was named
    ("prepare-latents-vae-is-a-zoo-checkpoint", "prepare-latents {tmp}/images --vae {tmp}/ckpt --out {tmp}/out "
     "--device cpu --workers 0 --resolution 16", "ckpt+images", 2,
     "{tmp}/ckpt/ema.safetensors (the VAE: --vae, or data.vae in a recipe) does not match the model; missing keys: "
     "encoder.conv_in.weight"),
    ("prepare-latents-vae-is-a-zoo-checkpoint-fix", "prepare-latents {tmp}/images --vae {tmp}/ckpt --out {tmp}/out "
     "--device cpu --workers 0 --resolution 16", "ckpt+images", 2,
     "(these are not AutoencoderKL (SD VAE) weights; give a local copy of the Stable Diffusion KL-f8 VAE: --vae DIR"),
    ("prepare-latents-huge-workers", "prepare-latents {tmp} --vae {tmp} --out {tmp}/out "
     "--workers 99999999999999999999", "-", 2,
     "--workers must be >= 0 and at most 256 (as data.num_workers), got 99999999999999999999"),
    # -- train: outputs, resume, devices
    ("train-out-is-a-file", f"train {TRAIN} --out {{tmp}}/out {FAST}", "out_file", 2, "--out {tmp}/out is a file"),
    ("train-out-holds-a-run", f"train {TRAIN} --out {{tmp}} {FAST}", "run_dir", 2, "--resume {tmp}"),
    ("train-unknown-device", f"train {TRAIN} --out {{tmp}}/out --device tpu0 {FAST}", "-", 2, "--device 'tpu0'"),
    pytest.param("train-cuda-without-gpu", f"train {TRAIN} --out {{tmp}}/out --device cuda {FAST}", "-", 2,
                 "no CUDA GPU", marks=pytest.mark.skipif(not NO_GPU, reason="this machine has a GPU")),
    ("train-negative-steps", f"train {TRAIN} --out {{tmp}}/out --steps -1", "-", 2, "--steps"),
    ("train-resume-missing", f"train {TRAIN} --out {{tmp}}/out --resume {{tmp}}/none {FAST}", "-", 2,
     "{tmp}/none"),
    ("train-resume-user-dir", f"train {TRAIN} --out {{tmp}}/out --resume {{tmp}}/out_user {FAST}", "user_dir", 2,
     "{tmp}/out_user is not a zoo checkpoint"),
    ("train-resume-hostile-state", f"train {TRAIN} --out {{tmp}}/out --resume {{tmp}}/ckpt {FAST}",
     "ckpt_hostile_state", 2,
     "{tmp}/ckpt/trainer_state.pt: it holds a pickled Python object"),
    ("train-resume-truncated-state", f"train {TRAIN} --out {{tmp}}/out --resume {{tmp}}/ckpt {FAST}",
     "ckpt_truncated_state", 2, "{tmp}/ckpt/trainer_state.pt"),
    ("train-resume-state-not-a-dict", f"train {TRAIN} --out {{tmp}}/out --resume {{tmp}}/ckpt {FAST}",
     "ckpt_state_list", 2, "{tmp}/ckpt/trainer_state.pt holds a list"),
    ("train-resume-state-changed-after-save", f"train {TRAIN} --out {{tmp}}/out --resume {{tmp}}/ckpt {FAST}",
     "ckpt_state_unsealed", 2, "trainer_state.pt has"),
    ("train-resume-weights-link-loop", f"train {TRAIN} --out {{tmp}}/out --resume {{tmp}}/ckpt {FAST}",
     "ckpt_model_link_loop", 2, "model.safetensors"),  # it was OSError's traceback (too many levels of links)
    ("sample-weights-link-loop", "sample {tmp}/ckpt --out {tmp}/out.png", "ckpt_ema_link_loop", 2,
     "ema.safetensors"),
    ("train-resume-no-state", f"train {TRAIN} --out {{tmp}}/out --resume {{tmp}}/ckpt {FAST}", "ckpt_no_state", 2,
     "trainer_state.pt is missing"),
    ("train-resume-another-model", f"train {TRAIN} --out {{tmp}}/out --resume {{tmp}}/ckpt --set model.depth=3 {FAST}",
     "ckpt", 2, "model.depth (2 there, 3 now) differs from the checkpoint's and changes the shapes of its weights"),
    ("train-nan-lr", f"train {TRAIN} --out {{tmp}}/out --set train.lr=.nan {FAST}", "-", 2, "train.lr"),
    ("train-zero-batch", f"train {TRAIN} --out {{tmp}}/out --set train.batch_size=0", "-", 2, "train.batch_size"),
    # -- train: data
    ("train-data-root-missing", f"train {TRAIN} --out {{tmp}}/out {IMAGES.replace('images', 'none')}", "-", 2,
     "{tmp}/none"),
    ("train-image-corrupt", f"train {TRAIN} --out {{tmp}}/out {IMAGES}", "images_corrupt", 2,
     "{tmp}/images/a/0.png"),
    ("train-image-not-an-image", f"train {TRAIN} --out {{tmp}}/out {IMAGES}", "images_text", 2,
     "{tmp}/images/a/0.png"),
    ("train-image-corrupt-mid-run", f"train {TRAIN} --out {{tmp}}/out {IMAGES}", "images_corrupt_later", 2,
     "{tmp}/images/b/1.png"),
    ("train-image-corrupt-in-a-worker", f"train {TRAIN} --out {{tmp}}/out {IMAGES} --set data.num_workers=1",
     "images_corrupt_later", 2, "{tmp}/images/b/1.png"),
    ("train-image-corrupt-mid-run-says-how-to-go-on", f"train {TRAIN} --out {{tmp}}/out {IMAGES}",
     "images_corrupt_later", 2, "(delete or replace the file; then go on with --resume {tmp}/out)"),
    ("train-image-corrupt-in-a-worker-says-the-same", f"train {TRAIN} --out {{tmp}}/out {IMAGES} "
     "--set data.num_workers=1", "images_corrupt_later", 2,
     "(delete or replace the file; then go on with --resume {tmp}/out)"),
    ("train-images-more-classes-than-model", f"train {TRAIN} --out {{tmp}}/out {IMAGES}", "images_five_classes",
     2, "key data.num_classes: dataset 'image_folder' has 5 classes, data.num_classes is 4"),  # = the model's
    ("train-images-more-classes-than-data-num-classes", f"train {TRAIN} --out {{tmp}}/out {IMAGES} "
     "--set data.num_classes=3", "images_five_classes", 2, "key data.num_classes: dataset 'image_folder' has 5 "
     "classes, data.num_classes is 3 (set data.num_classes to 5 where the model has as many (model.num_classes)"),
    ("train-data-root-beside-synthetic", f"train {TRAIN} --out {{tmp}}/out --set data.root={{tmp}}/images {FAST}",
     "images", 2, "data.root is set, but dataset 'synthetic' reads no root (--set data.dataset=image_folder"),
    ("train-data-classes-beyond-the-model", f"train {TRAIN} --out {{tmp}}/out --set data.num_classes=9 {FAST}", "-",
     2, "data.num_classes is 9, but diffusion.null_label 4 is one of its labels 0..8"),
    ("build-objective-type-a-list", f"build {TRAIN} --set diffusion.objective={{\"type\":[\"eps_mse\"]}}", "-", 2,
     "key diffusion.objective.type: type must be one of eps_mse, hybrid_vlb, multiscale, got ['eps_mse']"),
    ("build-time-sampling-type-a-mapping", f"build {TRAIN} --set diffusion.time_sampling={{\"type\":{{}}}}", "-", 2,
     "key diffusion.time_sampling.type: type must be one of uniform, logit_normal, got {}"),
    ("train-fd-of-one-channel-pixels", f"train {TRAIN} --out {{tmp}}/out --set model.in_channels=1 "
     f"--set train.eval_every=1 {FAST}", "-", 2,
     "key train.eval_every: its FD scores RGB images, and this pixel model samples 1-channel ones"),
    ("build-null-label-the-only-class", f"build {TRAIN} --set data.num_classes=1 --set diffusion.null_label=0", "-", 2,
     "data.num_classes to null (a model whose only label is the null label is unconditional)"),  # not 'at most 0'
    ("train-hybrid-objective-without-learned-sigma", f"train {TRAIN} --out {{tmp}}/out --set diffusion.objective=hybrid_vlb "
     f"{FAST}", "-", 2, "key diffusion.objective: the hybrid objective needs a learned-sigma output with 6 channels"),
    ("train-learned-sigma-under-plain-mse", f"train {TRAIN} --out {{tmp}}/out --set model.learn_sigma=true {FAST}", "-", 2,
     "a learned-sigma model needs objective type 'hybrid_vlb'"),
    ("train-continuous-time-input-on-a-discrete-schedule",
     f"train {TRAIN} --out {{tmp}}/out --set diffusion.time_input=uvit_continuous {FAST}", "-", 2,
     "key diffusion: time input 'uvit_continuous' does not fit a discrete schedule"),
    ("train-steps-past-the-decay", f"train {TRAIN} --out {{tmp}}/out --set train.lr_schedule=cosine --steps 40", "-", 2,
     "--steps 40 is past train.steps 30, where the cosine decay ends"),
    ("train-min-snr-gamma-underflows", f"train {TRAIN} --out {{tmp}}/out --set diffusion.min_snr_gamma=1e-300", "-", 2,
     "min_snr_gamma must be a number >= 0.001"),
    ("train-synthetic-at-another-size", f"train {TRAIN} --out {{tmp}}/out --set data.image_size=2 {FAST}", "-", 2,
     "data.image_size is 2, but the synthetic images take the model's input size 8"),
    ("train-null-label-beyond-the-table", f"train {TRAIN} --out {{tmp}}/out --set diffusion.null_label=5 {FAST}", "-",
     2, "diffusion.null_label is 5, but the model embeds labels 0..4 only"),
    ("train-images-wrong-size", f"train {TRAIN} --out {{tmp}}/out {IMAGES} --set data.image_size=16", "images", 2,
     "key data.image_size: data.image_size is 16, but the model takes 8x8 images (set data.image_size to 8"),
    ("train-images-into-a-latent-model", f"train {TRAIN} --out {{tmp}}/out {IMAGES} --set model.in_channels=4",
     "images", 2, "image folders give RGB images, but the model takes 4 input channels (give the model 3 input "
     "channels (model.in_channels, or model.in_chans for U-ViT), or train a latent recipe on zoo prepare-latents output)"),
    ("train-latents-garbage-shard", f"train {TRAIN} --out {{tmp}}/out {LATENT}", "latents_garbage", 2,
     "{tmp}/latents/0.safetensors"),
    ("train-latents-truncated-shard", f"train {TRAIN} --out {{tmp}}/out {LATENT}", "latents_truncated", 2,
     "{tmp}/latents/0.safetensors"),
    ("train-latents-missing-labels", f"train {TRAIN} --out {{tmp}}/out {LATENT}", "latents_no_labels", 2,
     "{tmp}/latents/0.safetensors"),
    ("train-latents-label-out-of-range", f"train {TRAIN} --out {{tmp}}/out {LATENT}", "latents_label_7", 2,
     "{tmp}/latents/0.safetensors: label 7 (sample 2) is outside the model's classes 0..3"),
    ("train-latents-negative-label", f"train {TRAIN} --out {{tmp}}/out {LATENT}", "latents_label_neg", 2,
     "{tmp}/latents/0.safetensors: label -1"),
    ("train-latents-float-labels", f"train {TRAIN} --out {{tmp}}/out {LATENT}", "latents_float_labels", 2,
     "{tmp}/latents/0.safetensors: 'labels'"),
    ("train-latents-label-count", f"train {TRAIN} --out {{tmp}}/out {LATENT}", "latents_label_count", 2,
     "{tmp}/latents/0.safetensors: 'labels'"),
    ("train-latents-nan", f"train {TRAIN} --out {{tmp}}/out {LATENT}", "latents_nan", 2,
     "{tmp}/latents/0.safetensors holds NaN"),
    ("train-latents-wrong-size", f"train {TRAIN} --out {{tmp}}/out {LATENT}", "latents_16px", 2,
     "prepare latents of 8x8: zoo prepare-latents --resolution 64"),
    ("train-latents-wrong-rank", f"train {TRAIN} --out {{tmp}}/out {LATENT}", "latents_3d", 2,
     "{tmp}/latents/0.safetensors: 'latents'"),
    ("train-latents-wrong-channels", f"train {TRAIN} --out {{tmp}}/out {LATENT} --set model.in_channels=3",
     "latents", 2, "gives samples of shape (4, 8, 8), the model takes (3, 8, 8)"),
    ("train-latents-wrong-size", f"train {TRAIN} --out {{tmp}}/out {LATENT} --set model.input_size=16",
     "latents", 2, "the model takes (4, 16, 16)"),
]

SUBPROCESS = ("sample-missing-path",)  # a real process costs its imports: seconds each


# ----------------------------------------------------------------------------- setups


def _yaml(text: str):
    return lambda tmp: (tmp / "r.yaml").write_bytes(text.encode() if isinstance(text, str) else text)


def _reseal(directory: Path) -> None:
    """Rewrite the file sizes a checkpoint's config.json lists, as if zoo had written the changed files."""
    payload = json.loads((directory / "config.json").read_text())
    payload["files"] = {p.name: p.stat().st_size for p in directory.iterdir() if p.name != "config.json"}
    (directory / "config.json").write_text(json.dumps(payload))


def _hostile_pickle(path: Path) -> None:
    """A torch zip file whose pickle calls ``os.system``: ``weights_only=True`` must refuse it."""
    import zipfile

    class Hostile:
        def __reduce__(self):
            return (os.system, ("echo owned",))

    torch.save({"step": 1}, path)
    with zipfile.ZipFile(path) as z:
        entries = {n: z.read(n) for n in z.namelist()}
    with zipfile.ZipFile(path, "w") as z:
        for name, data in entries.items():
            z.writestr(name, pickle.dumps({"step": Hostile()}, protocol=2) if name.endswith("data.pkl") else data)


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory) -> Path:
    """The tiny training recipe's model saved as a zoo checkpoint with EMA and trainer state."""
    recipe = zoo.load_recipe(RECIPES / "tiny_train.yaml")
    model = zoo.build_model(recipe)
    opt = torch.optim.AdamW(model.parameters())
    out = tmp_path_factory.mktemp("good") / "ckpt"
    return ckpt.save_checkpoint(out, model, recipe, ema=model, state={"step": 1, "optimizer": opt.state_dict()})


def _ckpt(change=None, reseal: bool = False):
    def setup(tmp: Path, good: Path) -> None:
        shutil.copytree(good, tmp / "ckpt")
        if change is not None:
            change(tmp / "ckpt")
        if reseal:
            _reseal(tmp / "ckpt")
    return setup


def _config(payload):
    return lambda d: (d / "config.json").write_text(payload if isinstance(payload, str) else json.dumps(payload))


def _bad_recipe(d: Path) -> None:
    payload = json.loads((d / "config.json").read_text())
    payload["recipe"]["model"]["depht"] = 2
    (d / "config.json").write_text(json.dumps(payload))


def _other_model(d: Path) -> None:
    payload = json.loads((d / "config.json").read_text())
    payload["recipe"]["model"]["hidden_size"] = 64
    (d / "config.json").write_text(json.dumps(payload))


def _no_model_section(d: Path) -> None:
    payload = json.loads((d / "config.json").read_text())
    del payload["recipe"]["model"]
    (d / "config.json").write_text(json.dumps(payload))


def _images(layout: dict[str, list[bytes | None]]):
    """``{class: [png bytes or None for a good 12x10 image]}`` under ``{tmp}/images``."""
    def setup(tmp: Path) -> None:
        from PIL import Image

        for cls, files in layout.items():
            (tmp / "images" / cls).mkdir(parents=True)
            for i, content in enumerate(files):
                path = tmp / "images" / cls / f"{i}.png"
                if content is None:
                    Image.new("RGB", (12, 10), (40 * i, 90, 200)).save(path)
                else:
                    path.write_bytes(content)
    return setup


def _png_bytes() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (12, 10), (1, 2, 3)).save(buf, format="PNG")
    return buf.getvalue()


def _latents(latents=None, labels=None, keys=("latents", "labels"), raw: bytes | None = None):
    def setup(tmp: Path) -> None:
        (tmp / "latents").mkdir()
        path = tmp / "latents" / "0.safetensors"
        if raw is not None:
            path.write_bytes(raw)
            return
        z = torch.randn(4, 4, 8, 8) if latents is None else latents
        y = torch.tensor([0, 1, 2, 3]) if labels is None else labels
        save_file({k: v for k, v in {"latents": z, "labels": y}.items() if k in keys}, str(path))
    return setup


def _truncated_shard(tmp: Path) -> None:
    _latents()(tmp)
    path = tmp / "latents" / "0.safetensors"
    path.write_bytes(path.read_bytes()[:-100])


def _write(rel: str, content: bytes):
    def setup(tmp: Path) -> None:
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / rel).write_bytes(content)
    return setup


def _user_dir(name: str):
    return _write(f"{name}/thesis.tex", b"\\documentclass{article}")


def _run_dir(tmp: Path, good: Path) -> None:
    shutil.copytree(good, tmp / "last")
    (tmp / "log.jsonl").write_text('{"step": 1}\n')


def _official(tmp: Path) -> None:
    torch.save({"x_embedder.proj.weight": torch.zeros(2, 2)}, tmp / "official.pt")


def _golden_truncated(tmp: Path) -> None:
    torch.save({"config": {}, "state_dict": {"w": torch.zeros(1000)}}, tmp / "golden.pt")
    data = (tmp / "golden.pt").read_bytes()
    (tmp / "golden.pt").write_bytes(data[: len(data) // 2])


PNG = _png_bytes()
SETUPS = {
    "-": lambda tmp: None,
    "yaml_broken": _yaml("model:\n\ttype: dit\n"),
    "yaml_binary": _yaml(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe garbage"),
    "yaml_empty": _yaml(""),
    "yaml_list": _yaml("- 1\n- 2\n"),
    "yaml_alias_bomb": _yaml("a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi")) + "model: *i\n"),
    "yaml_deep": _yaml("model: " + "[" * 20000 + "]" * 20000 + "\n"),
    "yaml_missing_base": _yaml("_base_: nowhere.yaml\n"),
    "golden_garbage": _write("golden.pt", b"not a torch file at all"),
    "golden_hostile": lambda tmp: _hostile_pickle(tmp / "golden.pt"),
    "golden_plain": lambda tmp: torch.save({"weights": torch.zeros(2)}, tmp / "golden.pt"),
    "golden_truncated": _golden_truncated,
    "official": _official,
    "official_garbage": _write("official.pt", random.Random(0).randbytes(300)),
    "official_hostile": lambda tmp: _hostile_pickle(tmp / "official.pt"),
    "official_truncated": lambda tmp: (_official(tmp), (tmp / "official.pt").write_bytes(
        (tmp / "official.pt").read_bytes()[:200])),
    "official_wrong_keys": _official,
    "out_file": _write("out", b"precious"),
    "out_user_dir": _user_dir("out"),
    "user_dir": _user_dir("out_user"),
    "json_broken": _write("c.json", b"{\"depth\": "),
    "weights_file": _write("model.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{}      "),
    "vae_garbage": _write("vae.safetensors", b"\x00" * 64),
    "vae_hostile": lambda tmp: _hostile_pickle(tmp / "vae.pth"),
    "out_png_not_png": _write("out.png", b"my notes, not a picture"),
    "out_png_of_a_user": lambda tmp: __import__("PIL.Image").Image.new("RGB", (4, 4)).save(tmp / "out.png"),
    "ckpt": _ckpt(),
    "ckpt_no_model": _ckpt(lambda d: (d / "model.safetensors").unlink()),
    "ckpt_no_state": _ckpt(lambda d: (d / "trainer_state.pt").unlink()),
    "ckpt_model_link_loop": _ckpt(lambda d: ((d / "model.safetensors").unlink(),
                                             (d / "model.safetensors").symlink_to("model.safetensors"))),
    "ckpt_ema_link_loop": _ckpt(lambda d: ((d / "ema.safetensors").unlink(),
                                           (d / "ema.safetensors").symlink_to("ema.safetensors"))),
    "ckpt_truncated_ema": _ckpt(lambda d: (d / "ema.safetensors").write_bytes((d / "ema.safetensors").read_bytes()[:64])),
    "ckpt_garbage_ema": _ckpt(lambda d: (d / "ema.safetensors").write_bytes(b"\xff" * 64), reseal=True),
    "ckpt_json_broken": _ckpt(_config('{"format": "zoo-checkpoint/1", "rec')),
    "ckpt_json_list": _ckpt(_config([1, 2, 3])),
    "ckpt_json_bad_recipe": _ckpt(_bad_recipe),
    "ckpt_json_other_model": _ckpt(_other_model),
    "ckpt_json_no_model_section": _ckpt(_no_model_section),
    "ckpt_hostile_state": _ckpt(lambda d: _hostile_pickle(d / "trainer_state.pt"), reseal=True),
    "ckpt_truncated_state": _ckpt(lambda d: (d / "trainer_state.pt").write_bytes(
        (d / "trainer_state.pt").read_bytes()[:300]), reseal=True),
    "ckpt_state_list": _ckpt(lambda d: torch.save([1, 2], d / "trainer_state.pt"), reseal=True),
    "ckpt_state_unsealed": _ckpt(lambda d: torch.save({"step": 1}, d / "trainer_state.pt")),
    "ckpt_user_file": _ckpt(lambda d: (d / "notes.txt").write_text("precious")),
    "run_dir": _run_dir,
    "images": _images({"a": [None, None], "b": [None, None]}),
    "images_corrupt": _images({"a": [PNG[:40], None], "b": [None]}),
    "images_text": _images({"a": [b"hello, not an image"], "b": [None]}),
    "images_corrupt_later": _images({"a": [None, None], "b": [None, PNG[:40]]}),
    "images_five_classes": _images({c: [None] for c in "abcde"}),
    "latents": _latents(),
    "latents_garbage": _latents(raw=b"\x10\x00\x00\x00\x00\x00\x00\x00" + b"\x00" * 40),
    "latents_truncated": _truncated_shard,
    "latents_no_labels": _latents(keys=("latents",)),
    "latents_label_7": _latents(labels=torch.tensor([0, 1, 7, 3])),
    "latents_label_neg": _latents(labels=torch.tensor([0, -1, 2, 3])),
    "latents_float_labels": _latents(labels=torch.tensor([0.0, 1.0, 2.0, 3.0])),
    "latents_label_count": _latents(labels=torch.tensor([0, 1, 2])),
    "latents_nan": _latents(latents=torch.full((4, 4, 8, 8), float("nan"))),
    "latents_3d": _latents(latents=torch.randn(4, 8, 8)),
    "latents_16px": _latents(latents=torch.randn(4, 4, 16, 16)),
}


def _setup(name: str, tmp: Path, good: Path) -> None:
    for part in name.split("+"):
        fn = SETUPS[part]
        fn(tmp, good) if part in ("run_dir",) or part.startswith("ckpt") else fn(tmp)


# ----------------------------------------------------------------------------- the checks


def _tree(root: Path) -> dict[str, tuple]:
    """Every path under ``root`` with its kind, size, mtime and (files) content hash."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
        out[str(p.relative_to(root))] = (p.is_dir(), st.st_size if p.is_file() else None, st.st_mtime_ns, digest)
    return out


def _expand(text: str, tmp: Path) -> str:
    return text.replace("{tmp}", str(tmp)).replace("{recipes}", str(RECIPES))


def _argv(template: str, tmp: Path) -> list[str]:
    """The command line: split on the template's spaces first, so a path with a space stays one argument."""
    return [_expand(part, tmp) for part in template.split()]


def _check_result(code: int, err: str, tmp: Path, before: dict, expected_code: int, expected: str) -> None:
    assert code == expected_code, err
    assert "Traceback" not in err and "weights_only=False" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("zoo") and "error:" in line]
    assert len(errors) == 1, err
    assert _expand(expected, tmp) in errors[0], err
    if errors[0].startswith("zoo: error:"):
        assert [line for line in err.splitlines() if "warning:" not in line] == errors, err  # one line, no more
    after = _tree(tmp)
    for path, entry in before.items():
        assert after.get(path) == entry, f"{path} changed or vanished"
    new = [p for p in after if p not in before and not p.split(os.sep)[0].startswith("out")]
    assert not new, f"files appeared outside the command's output: {new}"


def _ids(cases):
    return [c.id if hasattr(c, "id") else c[0] for c in cases]


@pytest.mark.parametrize(("case", "argv", "setup", "code", "expected"), CASES, ids=_ids(CASES))
def test_bad_input(case, argv, setup, code, expected, tmp_path, good_checkpoint, capsys, monkeypatch):
    monkeypatch.delenv("ZOO_TRACEBACK", raising=False)
    _setup(setup, tmp_path, good_checkpoint)
    before = _tree(tmp_path)
    start = time.perf_counter()
    result = main(_argv(argv, tmp_path))
    elapsed = time.perf_counter() - start
    _, err = capsys.readouterr()
    _check_result(result, err, tmp_path, before, code, expected)
    assert elapsed < TIME_LIMIT_S


@pytest.mark.slow
@pytest.mark.parametrize("case", SUBPROCESS)
def test_bad_input_in_a_real_process(case, tmp_path, good_checkpoint):
    (_, argv, setup, code, expected), = [c for c in CASES if not hasattr(c, "id") and c[0] == case]
    _setup(setup, tmp_path, good_checkpoint)
    before = _tree(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "ZOO_TRACEBACK"}
    proc = subprocess.run([sys.executable, "-m", "zoo", *_argv(argv, tmp_path)], capture_output=True,
                          text=True, timeout=TIME_LIMIT_S * 3, env=env, cwd=tmp_path)
    _check_result(proc.returncode, proc.stderr, tmp_path, before, code, expected)


def test_the_corpus_covers_every_command():
    commands = {(c.values[1] if hasattr(c, "values") else c[1]).split()[0] for c in CASES}
    assert len(CASES) >= 60 and {"build", "list", "parity", "convert", "sample", "train", "compare", "eval"} <= commands
