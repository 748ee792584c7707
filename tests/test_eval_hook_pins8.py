"""Pins of zoo.training.eval_hook (``train.eval_every``) that mutation testing found the rest of the suite let through.

* a reference of fewer than 2 images is refused when the hook is built (before step 1), not as a
  ``feature_statistics`` traceback at step ``eval_every``;
* ``fd_ref_key`` leaves the extractor weights' *path* out (their sha256 stays in): the same weights at another
  place are the same reference, other weights another.

Built on the tiny synthetic/folder recipes with the 48-feature pooling extractor: no training, no download.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import zoo
from zoo.errors import UserError
from zoo.training.data import build_dataset
from zoo.training.eval_hook import FDHook

from pool_extractors import Pool4

RECIPE = Path(__file__).parent / "recipes" / "tiny_train.yaml"  # DiT on 8x8 synthetic pixels, 4 classes
EVAL = ["train.log_every=1", "train.sample_every=0", "train.ckpt_every=0", "train.eval_every=2", "train.eval_n=4",
        "train.eval_extractor=test_pool4"]


@pytest.fixture(autouse=True)
def _setup(isolated_eval, one_thread, register_extractor):
    register_extractor("test_pool4", Pool4)


def _hook(tmp_path: Path, *settings: str) -> FDHook:
    recipe = zoo.load_recipe(RECIPE, EVAL + list(settings))
    shape = (3, recipe["model"]["input_size"], recipe["model"]["input_size"])
    num_classes = int(recipe["data"].get("num_classes") or 4)
    dataset = build_dataset(recipe["data"], shape, num_classes, int(recipe["train"].get("seed") or 0))
    return FDHook(recipe, recipe["train"], dataset, shape, tmp_path / "run", torch.device("cpu"), lambda *_: None)


def test_a_reference_of_one_image_is_refused_when_the_hook_is_built(tmp_path):
    """Mutation: ``len(images) < 2`` -> ``< 1``. A one-image folder passed the startup check, trained
    ``eval_every`` steps and then failed inside the statistics (a covariance needs two images); two pass."""
    from PIL import Image

    root = tmp_path / "imgs" / "only"
    root.mkdir(parents=True)
    Image.new("RGB", (8, 8), (10, 20, 30)).save(root / "0.png")
    folder = ["data.dataset=image_folder", f"data.root={tmp_path / 'imgs'}", "data.num_classes=1"]
    with pytest.raises(UserError, match=r"hold 1 image\(s\); reference statistics need at least 2"):
        _hook(tmp_path, *folder)
    Image.new("RGB", (8, 8), (30, 20, 10)).save(root / "1.png")
    assert _hook(tmp_path, *folder).dataset is not None


def test_the_reference_key_holds_the_extractor_weights_hash_not_their_path(tmp_path):
    """Mutation: the weights' path kept in ``fd_ref_key``. Two runs with the same extractor weights at two
    places (a copied cache, another machine) were marked 'measured differently'; other weights (another
    sha256) must still be another reference."""
    hook = _hook(tmp_path)
    hook.extractor.weights_file, hook.extractor.weights_sha256 = "/a/weights.pth", "1" * 64
    here = hook.reference_key
    hook.extractor.weights_file = "/elsewhere/weights.pth"
    assert hook.reference_key == here
    hook.extractor.weights_sha256 = "2" * 64
    assert hook.reference_key != here
