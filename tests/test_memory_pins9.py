"""Pins on the memory estimate's refusals and arithmetic that mutation testing found unheld: the bytes of
in-memory synthetic data (images and their int64 labels) and the weights-only check before sampling.
A tiny two-layer model on the meta device; free memory is set, never measured."""

from __future__ import annotations

import pytest
import torch

from zoo.errors import UserError

from test_domains import TwoLayer  # fc2(gelu(fc1(x))) on (B, 8) vectors

pytestmark = pytest.mark.usefixtures("one_thread")


def test_synthetic_data_counts_its_float_images_and_int64_labels(monkeypatch):
    """The synthetic dataset is held in memory as float32 samples plus one int64 label each (8 bytes): an estimate
    that left out the labels (or the images) under-counted ``data.size`` samples' worth of memory."""
    from zoo.memory import require_training_memory

    monkeypatch.setattr("zoo.memory.available_bytes", lambda device: 2**40)
    with torch.device("meta"):
        model = TwoLayer()
    base = require_training_memory(model, {}, {"dataset": "image_folder"}, torch.device("cpu"), 1).fixed
    synthetic = require_training_memory(model, {}, {"dataset": "synthetic", "size": 10}, torch.device("cpu"), 1)
    assert synthetic.fixed - base == 10 * (8 * 4 + 8)
    default = require_training_memory(model, {}, {}, torch.device("cpu"), 1)  # no dataset: synthetic, size 64
    assert default.fixed - base == 64 * (8 * 4 + 8)


def test_weights_that_do_not_fit_are_refused_before_sampling(monkeypatch):
    """``require_weights_memory`` refuses a model whose fp32 weights exceed the free memory, by one byte too: a
    check with slack let a model that cannot be loaded go on to the allocator (or the OOM killer)."""
    import zoo
    from zoo.memory import require_weights_memory

    recipe = zoo.load_recipe("emoji32/dit")
    with torch.device("meta"):
        params = sum(p.numel() for p in zoo.build_model(recipe).parameters())
    monkeypatch.setattr("zoo.memory.available_bytes", lambda device: 4 * params)
    require_weights_memory(recipe, "cpu")  # exactly fits
    monkeypatch.setattr("zoo.memory.available_bytes", lambda device: 4 * params - 1)
    with pytest.raises(UserError, match=f"the model's {params:,} parameters need"):
        require_weights_memory(recipe, "cpu")
    require_weights_memory(recipe, "cpu", bytes_per_param=2)  # half-precision weights fit in that


def test_zoo_trains_grid_warning_names_its_recipe_key_not_zoo_samples_flag(tmp_path, monkeypatch, capsys):
    """Inside zoo train the grid's memory warning said "use --batch-size N or less": zoo train has no such flag;
    sample.batch_size is what sets the grids' batch there."""
    import re
    import sys
    from pathlib import Path

    from zoo.cli import main

    def free(device):  # room to train; too little for the grid's batch
        return 200_000 if sys._getframe(1).f_code.co_name == "require_sampling_memory" else 2**40

    monkeypatch.setattr("zoo.memory.available_bytes", free)
    recipe = Path(__file__).parent / "recipes" / "tiny_train.yaml"
    assert main(["train", str(recipe), "--out", str(tmp_path / "run"), "--steps", "1", "--set", "train.sample_every=1",
                 "--set", "train.sample_n=64", "--set", "sample.batch_size=64", "--set", "train.ckpt_every=0"]) == 0
    out = capsys.readouterr()
    warning = next(line for line in (out.out + out.err).splitlines() if "no sample grid" in line)
    assert re.search(r"\(use --set sample\.batch_size=\d+ or less\)", warning) and "--batch-size" not in warning
