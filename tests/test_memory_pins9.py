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
