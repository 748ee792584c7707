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


def _tiny_run(tmp_path: Path) -> Path:
    import zoo
    from zoo.checkpoint import save_checkpoint

    recipe = zoo.load_recipe(RECIPE)
    torch.manual_seed(0)
    model = zoo.build_model(recipe)
    save_checkpoint(tmp_path / "run" / "last", model, recipe, ema=model)
    return tmp_path / "run"


def test_two_evals_differing_only_in_extractor_weights_keep_two_results(tmp_path, register_extractor):
    """Both wrote ``last-wpool-n8-<key>-ref<r>.json``: the second FD overwrote the first, though results are
    keyed by the weights' sha256. A built-in's result keeps its name (its weights are pinned)."""
    import json

    from zoo.cli import main
    from zoo.eval.extractors import build_extractor
    from zoo.eval.runner import RESULT_NAME, _extractor_key, result_name
    from zoo.run_summary import summarize

    register_extractor("wpool_keys", _WeightedPool)
    run, ref = _tiny_run(tmp_path), _reference(tmp_path)
    for factor in ("1.0", "3.0"):
        (tmp_path / f"w{factor}.txt").write_text(factor)
        assert main(["eval", str(run), "--n", "4", "--ref", str(ref), "--extractor", "wpool_keys",
                     "--extractor-weights", str(tmp_path / f"w{factor}.txt"), "--batch-size", "4"]) == 0
    results = sorted((run / "eval").glob("*.json"))
    assert len(results) == 2
    assert {json.loads(p.read_text())["extractor"]["weights_sha256"] for p in results} == {
        sha256_file(tmp_path / "w1.0.txt"), sha256_file(tmp_path / "w3.0.txt")}
    for path in results:  # readers of result names parse the new ones
        name = RESULT_NAME.fullmatch(path.name)
        assert name and name["checkpoint"] == "last" and name["extractor"] == "wpool_keys" and name["extractor_key"]
    assert summarize(str(run)).fd is not None
    lite0 = build_extractor("efficientnet_lite0")
    assert _extractor_key(lite0) is None
    old = result_name("last", "efficientnet_lite0", 8, "0123456789", "abcdef", _extractor_key(lite0))
    assert old == "last-efficientnet_lite0-n8-0123456789-refabcdef.json"
    assert RESULT_NAME.fullmatch(old)["extractor"] == "efficientnet_lite0"


class _Pool(Extractor):
    """2x2 pooled pixels: no weights file."""

    def forward(self, images):
        return F.adaptive_avg_pool2d(images.float() / 255.0, 2).flatten(1), None


def test_a_guidance_scale_of_2_and_of_2_0_share_the_samples(tmp_path, register_extractor):
    """``--cfg 2`` (a float) and ``--set sample.cfg.scale=2`` (a YAML int) keyed two samples folders, so the
    same images were sampled again; the protocol now records the scale, w and power as floats."""
    import json

    from zoo.cli import main

    register_extractor("pool_keys", _Pool)
    run, ref = _tiny_run(tmp_path), _reference(tmp_path)
    common = ["eval", str(run), "--n", "4", "--ref", str(ref), "--extractor", "pool_keys", "--batch-size", "4"]
    assert main([*common, "--cfg", "2"]) == 0
    assert main([*common, "--set", "sample.cfg.scale=2"]) == 0
    (samples,) = (run / "eval").glob("samples-*")
    (result,) = (run / "eval").glob("*.json")
    cfg = json.loads(result.read_text())["protocol"]["cfg"]
    assert (cfg["scale"], cfg["w"]) == (2.0, 2.0) and isinstance(cfg["scale"], float)


def test_an_extractor_that_names_weights_but_no_sha256_is_keyed_by_their_path():
    """Without a sha256 the path is all that tells two weights files apart: dropping it would share one cached
    reference (and one result name) between different weights."""
    from zoo.eval.extractors import extractor_identity

    hashed = {"name": "p", "weights": "/a/w.pth", "weights_sha256": "ab" * 32}
    assert extractor_identity(hashed) == extractor_identity({**hashed, "weights": "/b/copy.pth"})
    unhashed = {"name": "p", "weights": "/a/w.pth", "weights_sha256": None}
    assert extractor_identity(unhashed) != extractor_identity({**unhashed, "weights": "/b/other.pth"})
