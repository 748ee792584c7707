"""Pins on ``zoo parity``'s verdict (:mod:`zoo.parity`, :mod:`zoo.commands.parity`): the tolerance is
max abs error <= 1e-4, inclusive, and nothing looser; the relative error divides by the largest
|official output| over *all* outputs of a model that returns several; and the command's exit status and
float64 note follow the verdict.

Found by mutation testing: the golden files pass with errors near 1e-6 and the failing case was shifted by
1e-3, so a tolerance loosened tenfold, a strict ``<`` or a scale taken from the last output alone went
unnoticed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from zoo.parity import TOLERANCE, ParityResult, compare

pytestmark = pytest.mark.usefixtures("one_thread")

GOLDEN = Path(__file__).parent / "golden" / "golden_dit_tiny.pt"


def test_the_tolerance_is_1e_4_and_inclusive():
    """A max abs error of exactly 1e-4 passes, 2e-4 fails: ``<`` would fail the documented boundary and a
    looser TOLERANCE would call a port 10x off the official model a pass."""
    assert TOLERANCE == 1e-4
    assert ParityResult("dit", 1e-4, 0.0).passed
    assert not ParityResult("dit", 2e-4, 0.0).passed
    assert not ParityResult("dit", float("inf"), float("inf")).passed


def test_the_relative_error_divides_by_the_largest_output_over_all_outputs():
    """Two outputs with max |expected| 4 and 0.5: max_rel is max_abs / 4. Taking the last output's scale
    (0.5) would report an 8x larger relative error; errors are compared in the expected dtype (float64)."""
    e1 = torch.tensor([[-4.0, 1.0]], dtype=torch.float64)
    e2 = torch.tensor([0.5, -0.25], dtype=torch.float64)
    a1, a2 = e1 + torch.tensor([[0.0, 1e-3]], dtype=torch.float64), e2 - 2e-3
    max_abs, max_rel = compare((a1, a2), [e1, e2])
    assert max_abs == pytest.approx(2e-3, rel=1e-9) and max_rel == pytest.approx(2e-3 / 4, rel=1e-9)
    max_abs, max_rel = compare([a2, a1], (e2, e1))  # the order of the outputs does not matter
    assert max_rel == pytest.approx(2e-3 / 4, rel=1e-9)
    zero = torch.zeros(3, dtype=torch.float64)  # all-zero official outputs: the absolute error, no division by 0
    assert compare(zero + 1e-5, zero) == pytest.approx((1e-5, 1e-5), rel=1e-9)


def test_the_command_exits_1_for_an_error_between_1e_4_and_1e_3(tmp_path, capsys):
    """Official outputs shifted by 5e-4: zoo parity prints FAIL and exits 1 (a tolerance of 1e-3 would pass it,
    and an exit status of 0 whatever the verdict would let a CI parity job pass on a broken port)."""
    from zoo.cli import main

    golden = torch.load(GOLDEN, weights_only=True)
    torch.save(dict(golden, outputs=golden["outputs"] + 5e-4), tmp_path / "golden_dit_off.pt")
    assert main(["parity", str(tmp_path / "golden_dit_off.pt")]) == 1
    out = capsys.readouterr().out
    assert "FAIL (tolerance 0.0001)" in out
    assert 4e-4 <= float(out.strip().splitlines()[-1].split()[3]) <= 6e-4


def test_fp64_against_a_file_without_outputs_fp64_says_so_and_compares_with_outputs(tmp_path, capsys):
    """``--fp64`` on a file holding no outputs_fp64 runs in float64 against ``outputs`` and says so in one line;
    without --fp64 nothing is said (the note is what tells a reader the comparison was against float32 outputs)."""
    from zoo.cli import main
    from zoo.parity import run_parity

    golden = torch.load(GOLDEN, weights_only=True)
    golden.pop("outputs_fp64", None)
    path = tmp_path / "golden_dit_no64.pt"
    torch.save(golden, path)
    assert run_parity(path, dtype=torch.float64).reference == "outputs"
    assert main(["parity", str(path), "--fp64"]) == 0
    assert "--fp64: golden_dit_no64.pt holds no outputs_fp64" in capsys.readouterr().out
    assert main(["parity", str(path)]) == 0
    assert "outputs_fp64" not in capsys.readouterr().out
    assert run_parity(GOLDEN, dtype=torch.float64).reference == "outputs_fp64"
    assert run_parity(GOLDEN).reference == "outputs"  # float32 compares with outputs even where fp64 ones exist


def test_outputs_of_another_count_or_shape_are_refused_not_compared_in_part():
    """A model returning one output where the golden file holds two, or a (1, 4) output against (2, 4): zip
    would compare only the first output, and broadcasting would compare one row against both, both
    reporting a pass for a model that does not reproduce the official one."""
    from zoo.errors import UserError

    e = torch.arange(8, dtype=torch.float64).reshape(2, 4)
    with pytest.raises(UserError, match="the model returned 1 outputs, the golden file holds 2"):
        compare(e.clone(), [e, e])
    with pytest.raises(UserError, match=r"output shape \(1, 4\) differs from the golden \(2, 4\)"):
        compare(e[:1].clone(), e)
    with pytest.raises(UserError, match=r"output shape \(2, 4\) differs from the golden \(8,\)"):
        compare(e.clone(), e.flatten())


def test_fp64_runs_the_model_in_float64_against_outputs_fp64(capsys, monkeypatch):
    """``zoo parity GOLDEN --fp64`` on a file holding outputs_fp64 passes float64 to run_parity and says nothing
    about a missing outputs_fp64: dropping the flag would run float32 against ``outputs`` and print the note."""
    import zoo.parity
    from zoo.cli import main

    seen = []
    real = zoo.parity.run_parity
    monkeypatch.setattr(zoo.parity, "run_parity", lambda path, family=None, dtype=torch.float32: (
        seen.append(dtype), real(path, family, dtype=dtype))[1])
    assert main(["parity", str(GOLDEN), "--fp64"]) == 0
    assert main(["parity", str(GOLDEN)]) == 0
    assert seen == [torch.float64, torch.float32]
    assert "outputs_fp64" not in capsys.readouterr().out
