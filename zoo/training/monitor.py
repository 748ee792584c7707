"""What a person watching a run sees: a progress bar (or plain lines), log.jsonl, TensorBoard, loss.png.

On a terminal a tqdm bar shows step, loss, img/s and ETA, and each log record is printed above
it; when stderr is not a terminal (a log file, CI) every record is one plain line instead.
A training record is ``{step, loss, lr, grad_norm, steps_per_s, images_per_s}`` (means over the
steps since the previous one), with ``mse``, the unweighted error, after ``loss`` where the loss is
another number (Min-SNR weighted, learned σ, multi-scale); under fp16, ``grad_norm`` over the steps the gradient scaler did
not skip, and ``skipped_steps`` counts the others). log.jsonl is strict JSON: a value that is not
finite is written as null. Every record goes to ``OUT/log.jsonl`` and to TensorBoard event files in ``OUT/tb/``, and
``OUT/loss.png`` is redrawn (atomically, at most every few seconds) from the whole run's records. Only rank 0 has a monitor.
Evaluation records go to the same sinks, each as its own log.jsonl line and one printed line:
``train.eval_every``'s ``{"step", "fd", "fd_n", "fd_extractor", "fd_ref", "fd_ref_key", "fd_statistics", "fd_seed", "fd_seconds"}`` (TensorBoard ``eval/fd``, a
second axis in loss.png) and ``train.val_every``'s ``{"step", "val_loss", "val_n", "val_source", "val_seconds"}``
(TensorBoard ``eval/val_loss``, markers on the loss axis of loss.png).
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Callable

from zoo.atomic import disk_errors_named, write_file
from zoo.domains import is_int

#: TensorBoard scalars by group: the training records' and the evaluations' keys.
SCALARS = {"train": ("loss", "mse", "lr", "grad_norm", "images_per_s", "steps_per_s"), "eval": ("fd", "val_loss")}
PLOT_INTERVAL_S = 5.0  # loss.png is redrawn with a log record at most this often (a redraw costs ~0.1 s)


def read_log(path: Path) -> list[dict]:
    """The records of an existing ``log.jsonl`` (a resumed run continues its curve): JSON objects with an
    integer ``step``; other lines (torn, not UTF-8, not an object, a hand's edit) skipped."""
    records = []
    if path.is_file():
        for line in path.read_bytes().splitlines():
            try:
                record = json.loads(line.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                continue
            step = record.get("step") if isinstance(record, dict) else None
            if is_int(step):
                records.append(record)
    return records


def _after_a_torn_line(path: Path, size: int) -> str:
    """``"\n"`` where ``path`` (``size`` bytes) ends inside a line: a crash mid-write (a node lost, a network
    file system) can leave its last line torn, and the next record appended to it would be glued to it and
    lost. Ended rather than cut, the fragment stays a line of its own (skipped by :func:`read_log`)."""
    if size == 0:
        return ""
    with open(path, "rb") as f:
        f.seek(size - 1)
        return "" if f.read(1) == b"\n" else "\n"


def _log_scale(values) -> str:
    return "log" if min(values) > 0 and max(values) / min(values) > 10 else "linear"


def _points(records: list[dict], key: str) -> list[tuple[int, float]]:
    """(step, value) of the records that hold a finite ``key``."""
    return [(r["step"], r[key]) for r in records if key in r and math.isfinite(r[key])]


def _quiet_tensorboard_thread() -> None:
    """Keep the traceback of TensorBoard's writer thread off stderr (once per process).

    The thread keeps the error that ended it (a full disk) for the next ``add_scalar``, ``flush`` or
    ``close`` of the main thread to raise, and also lets it reach :func:`threading.excepthook`, which
    printed "Exception in thread ..." with a traceback: that print only is dropped."""
    import threading

    try:
        from tensorboard.summary.writer.event_file_writer import _AsyncWriterThread
    except ImportError:  # another TensorBoard: its print stays
        return
    previous = threading.excepthook
    if getattr(previous, "zoo_quiet_tensorboard", False):
        return

    def hook(args) -> None:
        if not (isinstance(args.thread, _AsyncWriterThread) and args.thread.exception is args.exc_value):
            previous(args)

    hook.zoo_quiet_tensorboard = True
    threading.excepthook = hook


def _after_event_files_of_this_second(tb: Path) -> None:
    """Wait for the next second when ``tb`` already holds an event file named with this one.

    TensorBoard reads a directory's event files in name order, and a name is
    ``events.out.tfevents.<unix seconds>.<host>.<pid>.<per-process counter>``: a second writer of
    the same process in the same second can sort before the first (counter ``10`` before ``9``),
    and then a resumed run's purge of the redone steps is read before the values it purges."""
    now = time.time()
    if any(tb.glob(f"events.out.tfevents.{int(now)}.*")):
        time.sleep(int(now) + 1 - now)


class LossPlot:
    """``loss.png``: loss against step (log-scale once it spans a decade), and the FD of the evaluations on
    a second axis when there are any. One figure kept for the run; each redraw writes a temporary name
    and renames it, so a reader never sees half a PNG."""

    def __init__(self, path: Path) -> None:
        from zoo.plotting import agg_matplotlib

        agg_matplotlib()
        from matplotlib.figure import Figure

        self.path = path
        self.fig = Figure(figsize=(6, 3.5), dpi=100)
        self.ax = self.fig.add_subplot()
        (self.line,) = self.ax.plot([], [], lw=1.2, label="training loss")
        (self.val_line,) = self.ax.plot([], [], "s-", color="tab:green", lw=1.2, ms=3, label="validation loss (EMA)")
        self.ax.set_xlabel("step")
        self.ax.set_ylabel("training loss")
        self.ax.grid(alpha=0.3)
        self.fig.subplots_adjust(left=0.13, right=0.87, bottom=0.15, top=0.95)
        self.fd_ax, self.fd_line = None, None

    def _draw_fd(self, points: list[tuple[int, float]]) -> None:
        if self.fd_ax is None:
            self.fd_ax = self.ax.twinx()
            (self.fd_line,) = self.fd_ax.plot([], [], "o-", color="tab:red", lw=1.2, ms=3, label="FD (EMA)")
            self.fd_ax.set_ylabel("FD of EMA samples", color="tab:red")
            self.fd_ax.tick_params(axis="y", colors="tab:red")
        steps, fds = zip(*points)
        self.fd_line.set_data(steps, fds)
        self.fd_ax.set_yscale(_log_scale(fds))
        self.fd_ax.relim()
        self.fd_ax.autoscale_view()

    def draw(self, records: list[dict]) -> None:
        points = _points(records, "loss")
        val_points = _points(records, "val_loss")
        fd_points = _points(records, "fd")
        if not points and not val_points and not fd_points:
            return
        if points or val_points:
            for line, pts in ((self.line, points), (self.val_line, val_points)):
                line.set_data([p[0] for p in pts], [p[1] for p in pts])
            self.ax.set_yscale(_log_scale([v for _, v in points + val_points]))
            self.ax.relim()
            self.ax.autoscale_view()
            if val_points:
                self.ax.set_ylabel("loss")
                self.ax.legend(loc="upper right", fontsize=8)
        if fd_points:
            self._draw_fd(fd_points)
        write_file(self.path, lambda tmp: self.fig.savefig(tmp, format="png"))


def _json_line(rec: dict) -> str:
    """One strict JSON line: NaN and inf (not JSON) become null."""
    return json.dumps({k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in rec.items()},
                      allow_nan=False) + "\n"


class Monitor:
    """Progress bar / plain lines, ``log.jsonl``, TensorBoard and ``loss.png`` of one run."""

    def __init__(self, out: Path, start: int, total: int, log: Callable[[str], None] = print,
                 tty: bool | None = None, branching: bool = False) -> None:
        self.out, self.log, self.start = out, log, start
        self.log_path = out / "log.jsonl"
        found = read_log(self.log_path)
        self.records = [r for r in found if r.get("step", 0) <= start]  # a resume drops what it redoes
        # ... from log.jsonl and TensorBoard too. ``branching`` (a resume from an older step_*/ than the
        # run's newest checkpoint): only once this run saves one, since until then last/ still holds the
        # branch the later records describe (a resume that stops, fails or hits a NaN before its first
        # save); this run's records wait in `pending`. Else the later records are a killed process's,
        # which no checkpoint holds: they go now, and this run's records are written as they come.
        self.pending: list[dict] | None = [] if len(self.records) < len(found) else None
        self.file = None
        self._writer = None
        if self.pending is not None and not branching:
            self.branch_saved()
        self.plot, self.plotted = LossPlot(out / "loss.png"), -math.inf
        self.bar = None
        # A bar only where both streams are a terminal: `zoo train ... | tee log` keeps every record line in the file
        if (sys.stderr.isatty() and sys.stdout.isatty()) if tty is None else tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr)

    @property
    def writer(self):
        """The TensorBoard writer, opened with this run's first written record: its purge of the steps
        after ``start`` (the ones a resume redoes) takes effect only then."""
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            _quiet_tensorboard_thread()
            _after_event_files_of_this_second(self.out / "tb")
            with self._tb_errors():
                self._writer = SummaryWriter(str(self.out / "tb"), purge_step=self.start + 1)
        return self._writer

    def _tb_errors(self) -> contextlib.AbstractContextManager:
        """A full or read-only disk under TensorBoard's writer as an error naming ``RUN/tb``."""
        return disk_errors_named(self.out / "tb")

    def advance(self) -> None:
        """One step done."""
        if self.bar is not None:
            self.bar.update(1)

    def _write(self, rec: dict) -> None:
        """One record to log.jsonl and TensorBoard (``train/...``, ``eval/...``), or to ``pending``."""
        if self.pending is not None:
            self.pending.append(rec)
            return
        self._append(_json_line(rec))
        self._scalars(rec)

    def _scalars(self, rec: dict) -> None:
        with self._tb_errors():
            for group, keys in SCALARS.items():
                for key in keys:
                    if key in rec:
                        self.writer.add_scalar(f"{group}/{key}", rec[key], rec["step"])
            self.writer.flush()

    def branch_saved(self) -> None:
        """This run saved a checkpoint: the records after ``start`` of the run it branched from leave
        log.jsonl and TensorBoard (the writer's purge), and this run's own records are written.

        log.jsonl is replaced in one atomic write holding both the kept records and this run's: a
        kill between dropping the old ones and adding the new ones would lose the new ones for good
        (the checkpoint just saved is past them, so no resume redoes them)."""
        if self.pending is None:
            return
        pending, self.pending = self.pending, None
        new = {id(r) for r in pending}
        lines = [_json_line(r) for r in self.records if id(r) not in new] + [_json_line(r) for r in pending]
        write_file(self.log_path, lambda tmp: tmp.write_text("".join(lines)))
        self.writer  # opened now: its purge of the later steps takes effect even when nothing is logged
        for rec in pending:
            self._scalars(rec)

    def record(self, rec: dict) -> None:
        """A log record: written to every sink, shown above the bar or as one line."""
        self.records.append(rec)
        self._write(rec)
        if time.monotonic() - self.plotted >= PLOT_INTERVAL_S:
            self.plot.draw(self.records)
            self.plotted = time.monotonic()
        grad = f"grad {rec['grad_norm']:.3g}  " if "grad_norm" in rec else ""
        grad += f"({rec['skipped_steps']} skipped)  " if rec.get("skipped_steps") else ""
        line = (f"step {rec['step']:>7d}  loss {rec['loss']:.5f}  lr {rec['lr']:.3g}  {grad}"
                f"{rec['steps_per_s']:.2f} steps/s  {rec['images_per_s']:.1f} img/s")
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{rec['loss']:.4f}", img_s=f"{rec['images_per_s']:.1f}", refresh=False)
            self.bar.write(line, file=sys.stderr)
        else:
            self.log(line)

    def record_eval(self, rec: dict) -> None:
        """An evaluation record (an FD of ``train.eval_every`` or a validation loss of ``train.val_every``):
        log.jsonl, TensorBoard ``eval/fd`` or ``eval/val_loss``, loss.png, one line."""
        self.records.append(rec)
        self._write(rec)
        self.plot.draw(self.records)  # evaluations are rare: always redrawn
        self.plotted = time.monotonic()
        if "fd" in rec:
            self.message(f"step {rec['step']:>7d}  fd {rec['fd']:.4f}  ({rec['fd_n']} EMA samples, "
                         f"{rec['fd_extractor']}, {rec['fd_seconds']:.1f} s)")
        if "val_loss" in rec:
            self.message(f"step {rec['step']:>7d}  val_loss {rec['val_loss']:.5f}  ({rec['val_n']} fixed draws on "
                         f"{rec['val_source']}, EMA, {rec['val_seconds']:.1f} s)")

    def _append(self, line: str) -> None:
        """Add one line to log.jsonl whole, or not at all: a full disk leaves no torn line (the next
        record would be glued to it and lost), and its error names the file."""
        from zoo.atomic import write_all

        if self.file is None:
            self.file = open(self.log_path, "ab", buffering=0)
            line = _after_a_torn_line(self.log_path, self.file.seek(0, 2)) + line
        start = self.file.seek(0, 2)
        with disk_errors_named(self.log_path):
            try:
                write_all(self.file, line.encode("utf-8"))
            except OSError:
                with contextlib.suppress(OSError):
                    self.file.truncate(start)
                raise

    def message(self, text: str) -> None:
        """A line that must not tear the bar."""
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            self.log(text)

    def close(self) -> None:
        if self.pending is not None:  # a branch that never saved: the plot goes back to what log.jsonl holds
            if self.plotted > -math.inf:
                self.plot.draw(read_log(self.log_path))
        elif self.file is not None and self.plotted < time.monotonic():  # the final curve the rate limit skipped
            self.plot.draw(self.records)
        if self.bar is not None:
            self.bar.close()
        try:
            if self._writer is not None:
                with self._tb_errors():  # its final flush: where the writer thread's error comes out last
                    self._writer.close()
        finally:
            if self.file is not None:
                self.file.close()
