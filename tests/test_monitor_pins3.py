"""Pins on what zoo.training.monitor writes for a person watching a run that no other test held: log.jsonl
stays strict JSON when a loss diverges (NaN and inf written as null, the run not stopped by its own log),
the progress line says how many steps the fp16 gradient scaler skipped, and loss.png ends with the last record."""

from __future__ import annotations

import json
import math

import pytest

from zoo.training.monitor import Monitor

pytestmark = pytest.mark.usefixtures("one_thread")


def _rec(step: int, **kw) -> dict:
    return {"step": step, "loss": 0.5, "lr": 1e-3, "grad_norm": 1.0, "steps_per_s": 2.0, "images_per_s": 64.0, **kw}


def test_a_non_finite_loss_is_logged_as_null_in_strict_json(tmp_path):
    """A diverged step (loss NaN, grad_norm inf) is one log.jsonl line with nulls: writing NaN verbatim is not
    JSON (jq and pandas refuse the file), and json.dumps(allow_nan=False) on it would crash the run."""
    lines: list[str] = []
    monitor = Monitor(tmp_path, start=0, total=4, log=lines.append, tty=False)
    try:
        monitor.record(_rec(1))
        monitor.record(_rec(2, loss=math.nan, grad_norm=math.inf))
    finally:
        monitor.close()
    text = (tmp_path / "log.jsonl").read_text()
    records = [json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in log.jsonl")) for line in text.splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert records[1]["loss"] is None and records[1]["grad_norm"] is None and records[1]["lr"] == 1e-3
    assert len(lines) == 2 and "nan" in lines[1]  # the printed line shows the value as it is


def test_the_progress_line_counts_the_steps_the_gradient_scaler_skipped(tmp_path):
    """Under fp16 a record with skipped_steps says `(N skipped)` on its line; dropping it hides a scaler that
    skips most steps (an lr too high for fp16) from the person watching."""
    lines: list[str] = []
    monitor = Monitor(tmp_path, start=0, total=4, log=lines.append, tty=False)
    try:
        monitor.record(_rec(1, skipped_steps=3))
        monitor.record(_rec(2, skipped_steps=0))
    finally:
        monitor.close()
    assert "(3 skipped)" in lines[0]
    assert "skipped" not in lines[1]


def test_loss_png_holds_the_last_records_after_close(tmp_path, monkeypatch):
    """loss.png is redrawn at most every few seconds while a run logs; the records after the last redraw
    are drawn when the run ends. Without that final redraw the curve of a short run stopped at its first
    record, and a long run's lost its last minutes."""
    import zoo.training.monitor as monitor_module

    monkeypatch.setattr(monitor_module, "PLOT_INTERVAL_S", 3600.0)  # however slow the machine: one redraw, the first
    monitor = Monitor(tmp_path, start=0, total=4, log=lambda *_: None, tty=False)
    try:
        for step in (1, 2, 3, 4):
            monitor.record(_rec(step, loss=1.0 / step))
        assert list(monitor.plot.line.get_data()[0]) == [1]
    finally:
        monitor.close()
    steps, losses = monitor.plot.line.get_data()
    assert list(steps) == [1, 2, 3, 4] and list(losses) == pytest.approx([1.0, 0.5, 1 / 3, 0.25])
    assert (tmp_path / "loss.png").stat().st_size > 0


@pytest.mark.parametrize("tail", [b'{"step": 3, "loss": 0.', b'{"step": 3, "loss": 0.4}'])
def test_a_resume_after_a_torn_last_line_keeps_its_own_first_record(tmp_path, tail):
    """A crash mid-write (a lost node, a network file system) left log.jsonl ending inside a line: the resumed
    run appended its first record to it, glued into one unreadable line, and zoo compare and loss.png lost
    it. A last line without its newline that is a whole record (a hand's edit) is kept too."""
    from zoo.training.monitor import read_log

    (tmp_path / "log.jsonl").write_bytes(json.dumps(_rec(2)).encode() + b"\n" + tail)
    monitor = Monitor(tmp_path, start=3, total=5, log=lambda *_: None, tty=False)
    try:
        monitor.record(_rec(4))
        monitor.record(_rec(5))
    finally:
        monitor.close()
    steps = [r["step"] for r in read_log(tmp_path / "log.jsonl")]
    assert steps == ([2, 4, 5] if tail.endswith(b".") else [2, 3, 4, 5])


def test_a_resume_after_an_intact_last_line_adds_no_empty_line(tmp_path):
    """A log.jsonl whose last line ends in its newline (a run stopped cleanly) is appended to as it is: reading
    the byte before that newline took the line for torn and wrote an empty line before the resumed records."""
    (tmp_path / "log.jsonl").write_text(json.dumps(_rec(1)) + "\n" + json.dumps(_rec(2)) + "\n")
    monitor = Monitor(tmp_path, start=3, total=5, log=lambda *_: None, tty=False)
    try:
        monitor.record(_rec(3))
    finally:
        monitor.close()
    text = (tmp_path / "log.jsonl").read_text()
    assert "\n\n" not in text and [json.loads(line)["step"] for line in text.splitlines()] == [1, 2, 3]
