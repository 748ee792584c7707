"""The ``zoo`` process and its standard streams: a reader that goes away, a closed stream, an ASCII locale."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TINY_TRAIN = ROOT / "tests" / "recipes" / "tiny_train.yaml"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
ENV.pop("ZOO_TRACEBACK", None)


def _train_args(out: Path) -> list[str]:
    return [sys.executable, "-m", "zoo", "train", str(TINY_TRAIN), "--out", str(out), "--steps", "6",
            "--set", "train.sample_every=0", "--set", "train.log_every=1", "--set", "train.ckpt_every=3"]


def test_a_stdout_reader_that_goes_away_does_not_end_the_run(tmp_path):
    """`zoo train ... | head -1`: the broken pipe of the first print after the reader left ended the run at
    once, nothing saved, exit 0. The reader here has left before the first line (unbuffered, so that the
    very first print meets the broken pipe, as a buffered one does once its 8 KiB fill)."""
    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run(_train_args(tmp_path / "run"), cwd=tmp_path, stdout=write, stderr=subprocess.PIPE,
                              text=True, timeout=300, env={**ENV, "PYTHONUNBUFFERED": "1"})
    finally:
        os.close(write)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.count("stdout was closed") == 1
    assert "zoo train: stdout was closed; the run goes on, its records are in log.jsonl" in done.stderr
    assert torch.load(tmp_path / "run" / "last" / "trainer_state.pt", weights_only=True)["step"] == 6
    assert len((tmp_path / "run" / "log.jsonl").read_text().splitlines()) == 6


def test_a_stdout_reader_that_goes_away_still_ends_a_listing_quietly():
    """`zoo list | head -1`: the reader has all it wanted; no note, status 0."""
    proc = subprocess.Popen([sys.executable, "-m", "zoo", "list"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**ENV, "PYTHONUNBUFFERED": "1"})
    proc.stdout.readline()
    proc.stdout.close()
    assert proc.wait(timeout=120) == 0
    assert proc.stderr.read() == b""


def test_a_closed_stdout_is_not_an_attribute_error(tmp_path):
    """`zoo list >&-` and `zoo train ... >&-` ended in AttributeError: 'NoneType' object has no attribute
    'flush', exit 1 (Python leaves sys.stdout None): they run, and their output goes nowhere."""
    listing = subprocess.run([sys.executable, "-m", "zoo", "list"], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, timeout=120, env=ENV,
                             preexec_fn=lambda: os.close(1))
    assert (listing.returncode, listing.stderr) == (0, "")
    train = subprocess.run(_train_args(tmp_path / "run"), cwd=tmp_path, stderr=subprocess.PIPE, text=True,
                           timeout=300, env=ENV, preexec_fn=lambda: os.close(1))
    assert train.returncode == 0 and "Traceback" not in train.stderr, train.stderr
    assert torch.load(tmp_path / "run" / "last" / "trainer_state.pt", weights_only=True)["step"] == 6


def test_text_an_ascii_locale_cannot_encode_is_escaped_not_a_traceback():
    """Under LC_ALL=C `zoo eval` printed its result file and then failed on the '±' of its summary
    (UnicodeEncodeError, exit 1); `zoo list` on the '×' of a block's summary."""
    done = subprocess.run([sys.executable, "-m", "zoo", "list"], cwd=ROOT, capture_output=True, timeout=120,
                          env={**ENV, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONIOENCODING": ""})
    assert done.returncode == 0 and b"Traceback" not in done.stderr, done.stderr
    assert b"depthwise k\\xd7k convolution" in done.stdout
