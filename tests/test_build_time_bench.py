"""benchmarks/build_time.py: the recipes a user names are the ones built, wherever it is run from."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from benchmark_scripts import load_benchmark

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("build_time")


def test_a_recipe_path_relative_to_the_callers_directory_is_built(bench, tmp_path, monkeypatch, capsys):
    """The builds run in the repository root: a relative path is passed resolved (it was 'recipe file not found')."""
    shutil.copyfile(ROOT / "tests" / "recipes" / "tiny_dit_pixels.yaml", tmp_path / "mydit.yaml")
    monkeypatch.chdir(tmp_path)
    bench.main(["mydit.yaml"])
    row = capsys.readouterr().out.splitlines()[-1]
    assert row.startswith("mydit ") and "42,968" in row and "FAILED" not in row, row


def test_a_missing_recipe_file_is_one_line_exit_2(bench, tmp_path, capsys):
    """It was a table row 'MISSING' and exit 1, after the other recipes had been timed."""
    with pytest.raises(SystemExit) as exit_:
        bench.main([str(tmp_path / "nope.yaml")])
    assert exit_.value.code == 2 and f"error: no recipe file {tmp_path / 'nope.yaml'}" in capsys.readouterr().err
