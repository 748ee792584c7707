"""Pins on ``zoo eval``, its distortion analysis and the classifier it scores with, that no other test
held: a samples folder short of ``n`` is refused rather than scored on fewer samples, an eval result
records how its reference images were read (``zoo compare`` marks results without it as another
protocol), ``--classifier-weights`` with a zoo classifier directory is refused, ``accuracy`` scores in
eval mode, and the classifier's stage transition normalises before its strided convolution."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import zoo
from zoo.checkpoint import save_checkpoint
from zoo.classifier import ConvNeXtClassifier, _Downsample, accuracy
from zoo.errors import UserError
from zoo.eval.extractors import Extractor
from zoo.eval.reference import save_npz

RECIPE = Path(__file__).parent / "recipes" / "tiny_train.yaml"  # DiT on 8x8 pixels, 4 classes

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_samples_folder_short_of_n_is_refused_not_scored_on_fewer(tmp_path):
    """Shards holding samples 0..3 cannot give n = 8: reading on would score an FD of 4 samples under
    the name of 8 (and a result file keyed n8)."""
    from zoo.eval.runner import sample_batches

    images = np.zeros((4, 8, 8, 3), dtype=np.uint8)
    save_npz(tmp_path / "shard-0000000-0000004.npz", images=images, labels=np.zeros(4, dtype=np.int64),
             indices=np.arange(4))
    assert sum(len(b[0]) for b in sample_batches(tmp_path, 4, 2)) == 4
    with pytest.raises(UserError, match="lacks samples from index 4 on"):
        list(sample_batches(tmp_path, 8, 2))


class _Pool(Extractor):
    name = "test_pool_pins4"

    def forward(self, images):
        return F.adaptive_avg_pool2d(images.float() / 255.0, 2).flatten(1), None


def test_an_eval_result_records_its_image_reading_and_compare_takes_it_as_current(
        tmp_path, isolated_eval, register_extractor):
    """The result's reference records ``image_decoding``: without it ``zoo compare`` (run_summary) reads a
    fresh result as one of images read the earlier way, another protocol than every other FD."""
    from zoo.cli import main
    from zoo.run_summary import OLDER_READING, summarize
    from zoo.training.crop import IMAGE_DECODING

    register_extractor(_Pool.name, _Pool)
    recipe = zoo.load_recipe(RECIPE)
    torch.manual_seed(0)
    model = zoo.build_model(recipe)
    save_checkpoint(tmp_path / "run" / "last", model, recipe, ema=model)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "ref.npz", arr_0=rng.integers(0, 256, size=(8, 8, 8, 3), dtype=np.uint8))
    assert main(["eval", str(tmp_path / "run"), "--n", "4", "--ref", str(tmp_path / "ref.npz"), "--extractor",
                 _Pool.name, "--batch-size", "4"]) == 0
    (written,) = (tmp_path / "run" / "eval").glob("*.json")
    assert json.loads(written.read_text())["reference"]["image_decoding"] == IMAGE_DECODING
    summary = summarize(str(tmp_path / "run"))
    assert summary.fd is not None and OLDER_READING not in summary.fd_reference_key


def test_classifier_weights_with_a_zoo_classifier_directory_is_refused(tmp_path):
    """A zoo classifier directory holds its own weights: ``--classifier-weights`` beside it would be
    ignored silently (scoring with other weights than the user named)."""
    from zoo.eval.distortion import build_scorer

    with pytest.raises(UserError, match="--classifier-weights goes with --classifier timm:NAME"):
        build_scorer(str(tmp_path / "classifier"), weights=str(tmp_path / "w.pth"))


class _TrainModeFlips(nn.Module):
    """Logits pointing at the label in eval mode, away from it in training mode."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        right = F.one_hot(x[:, 0, 0, 0].long(), 2).double() * self.scale
        return -right if self.training else right


def test_accuracy_scores_in_eval_mode_and_restores_the_mode():
    """The holdout accuracy is of the model as it will score (eval mode: no dropout, drop-path or batch
    statistics); scoring a training-mode model in its training mode reported another number."""
    model = _TrainModeFlips().train()
    images, labels = torch.tensor([0.0, 1.0, 1.0]).view(3, 1, 1, 1).expand(3, 1, 2, 2), torch.tensor([0, 1, 1])
    assert accuracy(model, images, labels) == 1.0
    assert model.training


def test_the_stage_transition_normalises_its_input():
    """``_Downsample`` is LayerNorm over channels, then the 2x2 stride-2 conv: its output ignores each
    position's channel scale and offset. Convolving the raw input (no norm) scales with it."""
    torch.manual_seed(0)
    net = ConvNeXtClassifier(2, image_size=8, dims=(4, 8), depths=(1, 1), stem=2).double()
    down = net.stages[1][0]
    assert isinstance(down, _Downsample)
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64)  # NHWC
    with torch.no_grad():
        np.testing.assert_allclose(down(3.0 * x + 1.0).numpy(), down(x).numpy(), atol=1e-4)
