"""Pins on ``zoo train-classifier``'s command (:mod:`zoo.commands.train_classifier`): its documented
defaults (as its help text states them), the
refusal of a zero channel or depth count and of an ``--out`` inside a checkpoint directory, and what the
saved record and the ``--json`` line carry (the source the classifier was trained on, the directory written).

Found by mutation testing: no test read the defaults, gave ``--dims 0,...`` or an ``--out`` inside a
checkpoint, or read ``source`` or ``path``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from zoo.cli import build_parser, main

pytestmark = pytest.mark.usefixtures("one_thread")

RECIPE = Path(__file__).parent / "recipes" / "tiny_train.yaml"  # synthetic 8x8 RGB, 4 classes


@pytest.fixture(autouse=True)
def _cache(monkeypatch, tmp_path):
    monkeypatch.setenv("ZOO_CACHE", str(tmp_path / "cache"))


def test_the_defaults_are_the_documented_ones():
    """1500 steps of 64 images at lr 2e-3, seed 0, dims 32,64 and depths 2,2, the data's image size: a changed
    default would silently train another classifier than the one the help text and README describe."""
    args = build_parser().parse_args(["train-classifier", "emoji32", "--out", "cls"])
    assert (args.steps, args.batch_size, args.lr, args.seed) == (1500, 64, 2e-3, 0)
    assert (args.dims, args.depths, args.image_size, args.device, args.json) == ([32, 64], [2, 2], None, None, False)


@pytest.mark.parametrize("dims, depths", [("0,8", "1,1"), ("8", "0"), ("8,-4", "1,1")])
def test_a_zero_or_negative_width_or_depth_is_refused_in_one_line(dims, depths, tmp_path, capsys):
    """``--dims 0,8``: a stage of 0 channels (or 0 blocks) is no classifier; a bound of ``< 0`` would let 0
    through to a convolution error or a stage that does nothing."""
    assert main(["train-classifier", str(RECIPE), "--out", str(tmp_path / "cls"), "--dims", dims,
                 "--depths", depths]) == 2
    err = capsys.readouterr().err
    assert "give positive integers, e.g. 32,64" in err and err.count("\n") == 1
    assert not (tmp_path / "cls").exists()


def test_the_record_names_its_source_and_the_json_line_the_directory_written(tmp_path, capsys, monkeypatch):
    """config.json's ``source`` says what data the classifier learnt (a recipe or dataset name) and the --json
    line's ``path`` where it was written: a record without them cannot be traced back by zoo eval's report.
    (The training itself is stubbed: what is pinned is what the command adds to its record.)"""
    import zoo.classifier_train
    from zoo.classifier import ConvNeXtClassifier

    def trained(data, **kw):
        model = ConvNeXtClassifier(data.num_classes, image_size=8, dims=kw["arch"]["dims"],
                                   depths=kw["arch"]["depths"], stem=2)
        return model, {"holdout_accuracy": 0.5, "train_accuracy": 0.5, "majority_baseline": 0.25,
                       "holdout_size": len(data.holdout_y), "train_size": len(data.train_y)}

    monkeypatch.setattr(zoo.classifier_train, "train_classifier", trained)
    out = tmp_path / "cls"
    assert main(["train-classifier", str(RECIPE), "--out", str(out), "--dims", "8", "--depths", "1", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)  # one JSON object and nothing else on stdout
    saved = json.loads((out / "config.json").read_text())
    assert printed["path"] == str(out) and printed["source"] == saved["source"] == str(RECIPE)
    assert "versions" in saved and "path" not in saved
    assert saved["holdout_size"] == printed["holdout_size"] == 7  # 10% of each class of the 64 synthetic images


def test_an_out_inside_a_checkpoint_directory_is_refused_before_the_data_are_read(tmp_path, capsys, monkeypatch):
    """``--out runs/dit/last/cls``: a classifier written inside a checkpoint would make that checkpoint's next
    save fail (zoo never replaces a directory holding files it did not write); refused before any step."""
    import zoo.classifier_train
    from zoo.checkpoint import CONFIG, FORMAT

    monkeypatch.setattr(zoo.classifier_train, "load_data", lambda *a, **k: pytest.fail("the data were read"))
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / CONFIG).write_text(json.dumps({"format": FORMAT}))
    assert main(["train-classifier", str(RECIPE), "--out", str(ckpt / "cls")]) == 2
    err = capsys.readouterr().err
    assert f"--out {ckpt / 'cls'} is inside the checkpoint directory {ckpt}" in err and err.count("\n") == 1
    assert sorted(p.name for p in ckpt.iterdir()) == [CONFIG]
