"""What ``zoo eval``'s files are keyed by: reference statistics by the extractor weights' sha256 (not
their path), results by the extractor's identity where its name does not pin its weights, and samples
by the guidance scale's value (``2`` and ``2.0`` are one scale)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from zoo.eval.extractors import Extractor, sha256_file

RECIPE = Path(__file__).parent / "recipes" / "tiny_train.yaml"  # DiT on 8x8 pixels, 4 classes

pytestmark = pytest.mark.usefixtures("one_thread", "isolated_eval")


class _WeightedPool(Extractor):
    """2x2 pooled pixels times a factor read from a weights file: other weights, other features."""

    def __init__(self, weights: str | None = None) -> None:
        super().__init__()
        self.weights_file, self.weights_sha256 = str(weights), sha256_file(weights)
        self.factor = float(Path(weights).read_text())

    def forward(self, images):
        return F.adaptive_avg_pool2d(images.float() / 255.0, 2).flatten(1) * self.factor, None


def _reference(tmp_path: Path) -> Path:
    path = tmp_path / "ref.npz"
    np.savez(path, arr_0=np.random.default_rng(0).integers(0, 256, size=(8, 8, 8, 3), dtype=np.uint8))
    return path


def test_the_same_weights_under_another_path_reuse_the_cached_reference(tmp_path, register_extractor):
    """The cache was keyed by the weights' path: a copy, a symlink or a relative spelling of the same file
    computed the reference features again (for Inception at 50K images, a long recompute)."""
    from zoo.eval.extractors import build_extractor
    from zoo.eval.reference import load_reference

    register_extractor("wpool_keys", _WeightedPool)
    ref = _reference(tmp_path)
    (tmp_path / "w.txt").write_text("1.0")
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / "w.txt").write_text("1.0")
    (tmp_path / "w3.txt").write_text("3.0")
    lines: list[str] = []
    for weights in ("w.txt", "copy/w.txt", "w3.txt"):
        load_reference(str(ref), build_extractor("wpool_keys", str(tmp_path / weights)), 8, 4, log=lines.append)
    computed = [line for line in lines if "computing reference features" in line]
    assert len(computed) == 2  # the copy reused the first; other weights (another sha256) computed anew
