"""benchmarks/train_step.py: a bad option is refused up front (argparse's error, exit 2), not once per config."""

from __future__ import annotations

import pytest
import torch

from benchmark_scripts import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("train_step")


@pytest.mark.parametrize("argv, expected", [
    (["--batch", "0"], "--batch 0: the batch must be a positive integer"),
    (["--batch", "nope=4"], "--batch nope=4: no config 'nope'"),
    (["--threads", "0"], "argument --threads: 0 is not a positive integer"),
    (["--warmup", "-1"], "argument --warmup: -1 is negative"),
    (["--device", "gpu"], "--device 'gpu' is not a device"),
    pytest.param(["--device", "cuda"], "--device cuda: no CUDA GPU is available on this machine",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")),
])
def test_bad_options_exit_2_before_any_config_runs(bench, monkeypatch, capsys, argv, expected):
    monkeypatch.setattr(bench.subprocess, "run", lambda *a, **k: pytest.fail("a config ran despite the bad option"))
    with pytest.raises(SystemExit) as exit_:
        bench.main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    last = err.splitlines()[-1]
    assert ": error: " in last and expected in last, err
