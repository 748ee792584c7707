"""benchmarks/vs_official.py: the how-to without a checkout, and the refusals a user can meet."""

from __future__ import annotations

import pytest

from benchmark_scripts import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("vs_official")


def test_without_checkout_is_a_mistake_that_says_how_to_get_one(bench, capsys):
    """Exit 0 with the how-to on stdout read as a passed benchmark to a script; it is exit 2 on stderr."""
    assert bench.main([]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("vs_official: error: --official CHECKOUT is required\n")
    for repo in ("facebookresearch/DiT", "baofff/U-ViT", "qihao067/DiMR"):
        assert f"git clone https://github.com/{repo}" in err


def test_missing_directory_is_one_line_exit_2(bench, tmp_path, capsys):
    assert bench.main(["--official", str(tmp_path / "nope"), "--model", "dit_s_2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "facebookresearch/DiT" in err[0]


def test_a_relative_checkout_path_reaches_the_memory_runs_and_a_missing_gpu_is_one_line(bench, tmp_path, capsys,
                                                                                           monkeypatch):
    """`--official DiT` after a git clone: the peak-memory subprocesses (run from the repository root)
    looked for ROOT/DiT, failed, and the table showed '-' without a word."""
    import subprocess
    import types

    (tmp_path / "DiT").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(bench, "run", lambda args: {"threads": 1, "params": 1, "official_ms": 2.0, "zoo_ms": 1.0,
                                                    "ratio": 2.0, "ratios": [2.0, 2.0], "load_avg": (1.0, 1.0, 1.0)})
    commands = []

    def child(cmd, **kwargs):
        commands.append(cmd)
        return types.SimpleNamespace(returncode=0, stdout='{"peak_mib": 5}', stderr="")

    monkeypatch.setattr(subprocess, "run", child)
    assert bench.main(["--official", "DiT", "--model", "dit_s_2"]) == 0
    assert len(commands) == 2 and all(cmd[cmd.index("--official") + 1] == str(tmp_path / "DiT") for cmd in commands)
    assert "peak memory: official 5 MiB, zoo 5 MiB" in capsys.readouterr().out
    if not __import__("torch").cuda.is_available():
        with pytest.raises(SystemExit) as exit_:
            bench.main(["--official", "DiT", "--model", "dit_s_2", "--device", "cuda"])
        assert exit_.value.code == 2 and "no CUDA GPU is available" in capsys.readouterr().err


def test_unequal_parameter_counts_refuse_to_time(bench, tmp_path, capsys, monkeypatch):
    """A checkout whose model differs from the recipe is refused before any step is timed."""
    (tmp_path / "models.py").write_text(
        "import torch\n"
        "def DiT_S_2(**kwargs):\n"
        "    return torch.nn.Linear(3, 3)\n"
    )
    monkeypatch.setattr(bench, "make_step", lambda *a, **k: pytest.fail("timed despite unequal counts"))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert bench.main(["--official", str(tmp_path), "--model", "dit_s_2", "--no-memory"]) == 2
    err = capsys.readouterr().err
    assert "parameter counts differ: official 12, zoo 32,963,360" in err


def test_dit_recompute_is_refused(bench, tmp_path, capsys):
    assert bench.main(["--official", str(tmp_path), "--model", "dit_s_2", "--recompute", "--no-memory"]) == 2
    assert "no activation recomputation" in capsys.readouterr().err


def test_dimr_stage_configs_match_the_recipes(bench):
    """The official configs built here are the recipes' widths, depths and patches (M/3R and XL/2R)."""
    m3 = bench._dimr_stages("dimr_m_3r")
    assert [(s["dim"], s["num_blocks"], s["input_feature_ratio"], s["block_type"][0]) for s in m3] == [
        (768, 15, 4, "T"), (384, 8, 2, "C"), (192, 8, 1, "C")]
    xl = bench._dimr_stages("dimr_xl_2r")
    assert [(s["dim"], s["hidden_dim"], s["num_blocks"]) for s in xl] == [(960, 1920, 39), (480, 960, 20)]
    assert xl[0]["num_attention_heads"] == 16


def test_as_released_recomputes_on_zoos_side_as_the_recipe_trains_and_excludes_recompute(bench, capsys):
    """--as-released: zoo's side recomputes exactly when its recipe's train.grad_checkpointing says so
    (U-ViT-M/4 on, as the official config; DiMR-M/3R off), and it cannot be combined with --recompute."""
    import torch

    assert bench._recipe_recomputes("uvit_m_4") and not bench._recipe_recomputes("dimr_m_3r")
    with torch.device("meta"):
        uvit = bench.build_zoo("uvit_m_4", recompute=False, as_released=True)
        dimr = bench.build_zoo("dimr_m_3r", recompute=True, as_released=True)
    assert uvit.blocks.grad_checkpointing is True
    assert dimr.grad_checkpointing == [False, False, False]
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--official", ".", "--recompute", "--as-released"])
    assert exit_.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
