"""Pins on ``zoo compare`` that no other test held: the timed columns are the median of the timed rounds
(one slow round, a GC pause or another process, must not move them), a PDF plot is zoo's by the *last*
trailer's info dictionary (an incremental save by another program appends a newer one), and the same
recipe given twice keeps its short plot label (identical paths need no telling apart)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

import zoo.compare as compare

RECIPE = Path(__file__).parent / "recipes" / "tiny_train.yaml"

pytestmark = pytest.mark.usefixtures("one_thread")


class _FakeBench:
    def __init__(self, *args, **kwargs):
        pass

    def step(self):
        pass

    def nfe(self):
        pass

    @contextlib.contextmanager
    def evaluating(self):
        yield

    def resident_bytes(self):
        return 0


def test_the_timed_columns_are_the_median_of_the_rounds(monkeypatch):
    """Rounds of 1, 1 and 10 ms report 1 ms: a mean (4 ms) lets one slow round (a GC pause, another
    process on the GPU) decide which recipe looks faster."""
    rounds = iter([{"0": [0.001, 0.010, 0.001]}, {"0": [0.002, 0.002, 0.020]}])
    monkeypatch.setattr(compare, "Bench", _FakeBench)
    monkeypatch.setattr(compare, "_step_peak_bytes", lambda bench, dev: 0)
    monkeypatch.setattr(compare, "time_interleaved", lambda *args, **kwargs: next(rounds))
    (row,) = compare.measure([str(RECIPE)], device="cpu", warmup=0, repeats=3)
    assert row.train_step_ms == pytest.approx(1.0) and row.sample_ms_per_nfe == pytest.approx(2.0)


def _pdf(first_creator: bytes, last_creator: bytes) -> bytes:
    """A PDF saved once (info object 1) and then incrementally (info object 5, a second trailer)."""
    return (b"%PDF-1.4\n1 0 obj\n<< /Creator (" + first_creator + b") >>\nendobj\n"
            b"trailer\n<< /Size 2 /Info 1 0 R >>\n%%EOF\n"
            b"5 0 obj\n<< /Creator (" + last_creator + b") >>\nendobj\n"
            b"trailer\n<< /Size 6 /Prev 9 /Info 5 0 R >>\n%%EOF\n")


def test_a_pdf_is_zoos_by_its_last_trailers_info(tmp_path):
    """A zoo plot re-saved incrementally by another program names a new info dictionary in the appended
    trailer: it is no longer zoo's to replace. Reading the first trailer took it for zoo's (and a file
    another program last wrote would be overwritten); the reverse case is zoo's own."""
    creator = compare.PLOT_CREATOR.encode()
    edited, ours = tmp_path / "edited.pdf", tmp_path / "ours.pdf"
    edited.write_bytes(_pdf(creator, b"Inkscape"))
    ours.write_bytes(_pdf(b"Inkscape", creator))
    assert not compare.a_zoo_plot(edited)
    assert compare.a_zoo_plot(ours)


def test_a_recipe_given_twice_keeps_its_short_label():
    """Two identical paths cannot be told apart by more folders: each keeps its stem (told apart from the
    other recipes only). Comparing a path with itself fell through to the full path for both."""
    assert compare.plot_labels(["a/b/dit.yaml", "a/b/dit.yaml"]) == ["dit", "dit"]
    assert compare.plot_labels(["x/emoji32/dit.yaml", "x/emoji32/dit.yaml", "x/imagenet/dit.yaml"]) == [
        "emoji32/dit", "emoji32/dit", "imagenet/dit"]
