"""benchmarks/train_demo.py: a GPU-only option on a machine without one is refused (one line, exit 2)."""

from __future__ import annotations

import sys

import pytest
import torch

from benchmark_scripts import load_benchmark


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_paper_without_a_gpu_is_refused_before_anything_runs(monkeypatch, capsys):
    """It printed 'skipped' on stderr, timed the emoji recipes and exited 0, unlike every other benchmark."""
    bench = load_benchmark("train_demo")
    monkeypatch.setattr(bench, "launch", lambda *a, **k: pytest.fail("a recipe ran despite the refusal"))
    monkeypatch.setattr(sys, "argv", ["train_demo.py", "--paper"])
    with pytest.raises(SystemExit) as exit_:
        bench.main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    assert err.splitlines()[-1].startswith("train_demo.py: error: --paper: no CUDA GPU is available on this machine")
