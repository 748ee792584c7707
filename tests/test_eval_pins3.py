"""Pins on ``zoo eval`` and its distortion analysis that no other test held: ``--weights raw`` samples
the raw weights it records (not the EMA a checkpoint also holds), the distortion analysis rewrites the
eval JSON without the in-memory ``path`` key, and the classifier's size rule (stem x 2^(stages-1)) and its refusal of a single class, and ``quick_fd`` (train.eval_every) scoring exactly ``n``
samples when ``n`` is not a multiple of the batch size, and where a checkpoint outside any run evaluates into
(beside it: a checkpoint directory is replaced whole by its next save)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import zoo
from zoo.checkpoint import save_checkpoint
from zoo.classifier import ConvNeXtClassifier
from zoo.errors import UserError
from zoo.eval.distortion import Scorer, analyse
from zoo.eval.extractors import Extractor
from zoo.eval.reference import save_npz

RECIPE = Path(__file__).parent / "recipes" / "tiny_train.yaml"  # DiT on 8x8 pixels, 4 classes

pytestmark = pytest.mark.usefixtures("one_thread")


def _raw_and_ema_checkpoint(tmp_path: Path):
    recipe = zoo.load_recipe(RECIPE)
    torch.manual_seed(0)
    raw, ema = zoo.build_model(recipe), zoo.build_model(recipe)
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(0.5)  # the EMA copy differs from the raw weights everywhere
    return recipe, save_checkpoint(tmp_path / "run" / "last", raw, recipe, ema=ema), raw, ema


@pytest.mark.parametrize("weights", ["raw", "ema"])
def test_weights_raw_samples_the_raw_weights_it_hashes_and_records(tmp_path, weights):
    """With ``--weights raw`` the model sampled must be the raw weights (model.safetensors), the file whose
    sha256 keys the samples: loading the EMA there (the default) would record and key raw weights while
    every sample came from the EMA, so raw and EMA evals silently gave the same images."""
    from zoo.eval.extractors import sha256_file
    from zoo.eval.runner import EvalRequest, _hashed_model

    recipe, ckpt, raw, ema = _raw_and_ema_checkpoint(tmp_path)
    model, origin, weights_file, digest = _hashed_model(EvalRequest(source=str(ckpt), weights=weights), recipe,
                                                        ckpt, torch.device("cpu"))
    want = (raw if weights == "raw" else ema).state_dict()
    got = model.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in got.items() if v.is_floating_point())
    assert weights_file.name == ("model.safetensors" if weights == "raw" else "ema.safetensors")
    assert digest == sha256_file(weights_file)


class _FirstPixelScorer(Scorer):
    """Own-class probability = red pixel / 255 (2 classes)."""

    num_classes = 2

    def forward(self, images):
        p = images[:, 0, 0, 0].double() / 255.0
        return torch.stack([p, 1 - p], 1)

    def describe(self):
        return {"kind": "test", "weights_sha256": "0" * 64}


def test_the_distortion_analysis_rewrites_the_eval_json_without_its_path_key(tmp_path):
    """``analyse`` gets the result zoo eval returned (with ``path`` added in memory) and rewrites the JSON:
    the file must keep zoo eval's own keys plus ``distortion``, not gain a ``path`` naming where it lay
    (stale once the eval directory is copied, and absent from a result without --distortion)."""
    images = torch.full((4, 3, 4, 4), 200, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.tensor([10, 250, 20, 240], dtype=torch.uint8)
    samples = tmp_path / "eval" / "samples-last-abc"
    save_npz(samples / "shard-0000000-0000004.npz", images=images.permute(0, 2, 3, 1).numpy(),
             labels=np.zeros(4, dtype=np.int64), indices=np.arange(4))
    path = tmp_path / "eval" / "last-x-n4-abc-ref123456.json"
    on_disk = {"metrics": {"fd": 1.0}, "n": 4, "samples": str(samples), "protocol": {"seed": 0}}
    path.write_text(json.dumps(on_disk))
    out = analyse({**on_disk, "path": str(path)}, _FirstPixelScorer(), threshold=0.5, batch_size=2,
                  log=lambda _: None)
    saved = json.loads(path.read_text())
    assert set(saved) == set(on_disk) | {"distortion"}
    assert saved["distortion"]["rejected"] == 2 and out["path"] == str(path)


def test_the_classifier_takes_every_size_its_stem_and_stage_halvings_divide():
    """Reduction = stem x 2^(stages-1): two stages with stem 2 take 12x12 images (12 % 4 == 0) and refuse
    6x6. Counting a halving per stage (2^stages) refused sizes the network takes."""
    torch.manual_seed(0)
    net = ConvNeXtClassifier(3, image_size=12, dims=(8, 16), depths=(1, 1), stem=2).eval()
    assert net(torch.zeros(2, 3, 12, 12)).shape == (2, 3)
    with pytest.raises(UserError, match="reduction 4"):
        ConvNeXtClassifier(3, image_size=6, dims=(8, 16), depths=(1, 1), stem=2)


class _Pool(Extractor):
    name = "test_pool_pins3"

    def forward(self, images):
        f = F.adaptive_avg_pool2d(images.float() / 255.0, 2).flatten(1)
        return f, None


def test_quick_fd_scores_exactly_n_samples_when_the_batch_does_not_divide_n(tmp_path, monkeypatch, isolated_eval):
    """``quick_fd(n=5, batch_size=4)`` samples 0..3 and 4 only: a last batch run to full size scored 8
    samples, an FD of another sample count (and other samples) than zoo eval --n 5 reports."""
    import zoo.eval.runner as runner

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "ref.npz", arr_0=rng.integers(0, 256, size=(16, 8, 8, 3), dtype=np.uint8))
    counts, real = [], runner.extract

    def counting(*args, **kwargs):
        feats = real(*args, **kwargs)
        counts.append(len(feats.features))
        return feats

    monkeypatch.setattr(runner, "extract", counting)
    recipe = zoo.load_recipe(RECIPE)
    torch.manual_seed(0)
    model = zoo.build_model(recipe)
    fd = runner.quick_fd(model, recipe, n=5, ref=str(tmp_path / "ref.npz"), extractor=_Pool(), batch_size=4)
    assert np.isfinite(fd) and counts[0] == 5


def test_a_checkpoint_outside_a_run_evaluates_into_a_folder_beside_it(tmp_path):
    """A checkpoint that lies in no run (no sibling last/ or log.jsonl) evaluates into ``CKPT-eval`` beside
    it; its samples and results written inside the checkpoint directory would be lost when a save replaces
    that directory whole, and make it a directory of foreign files."""
    from zoo.eval.runner import locate

    recipe = zoo.load_recipe(RECIPE)
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "ckpt", zoo.build_model(recipe), recipe)
    assert locate(ckpt) == (ckpt, tmp_path / "ckpt-eval")
    _, run_ckpt, _, _ = _raw_and_ema_checkpoint(tmp_path)
    assert locate(run_ckpt.parent) == (run_ckpt, run_ckpt.parent / "eval")  # a run: its eval/


def test_a_classifier_of_one_class_is_refused():
    """A 1-class softmax gives every sample probability 1 for its class: a distortion share of 0 whatever
    the samples look like. It must be refused when built, not scored."""
    with pytest.raises(UserError, match="at least 2 classes"):
        ConvNeXtClassifier(1, image_size=8, dims=(8,), depths=(1,))
    assert ConvNeXtClassifier(2, image_size=8, dims=(8,), depths=(1,)).num_classes == 2
