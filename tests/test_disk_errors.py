"""A full or read-only disk: one line naming the path (exit 2), nothing half-written, readers never write."""

from __future__ import annotations

import errno
import json
import os
import shutil
import threading
from pathlib import Path

import pytest
import torch

from zoo import atomic
from zoo import checkpoint as ckpt
from zoo.cli import main
from zoo.weights import load_weights

RECIPES = Path(__file__).parent / "recipes"
FULL = "No space left on device"


def _cli(capsys, *args) -> tuple[int, str]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


# ----------------------------------------------------------------------------- the run lock


def test_a_full_disk_at_the_run_lock_names_the_lock_file_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    """Its write failed with "the disk is full (No space left on device; ...)", no path named, and
    the lock file and its descriptor stayed."""
    run = tmp_path / "run"
    lock = run / ".zoo-train.lock"
    real_write, fds = os.write, []

    def full(fd, data):
        if lock.exists() and os.path.samestat(os.fstat(fd), os.stat(lock)):
            fds.append(fd)
            raise OSError(errno.ENOSPC, FULL)
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full)
    code, err = _cli(capsys, "train", RECIPES / "tiny_train.yaml", "--out", run, "--set", "train.steps=1")
    monkeypatch.undo()
    assert code == 2 and "Traceback" not in err
    assert err.splitlines()[-1].startswith(f"zoo: error: {lock}: the disk is full")
    assert fds and not lock.exists()
    with pytest.raises(OSError):  # closed
        os.fstat(fds[0])


# ----------------------------------------------------------------------------- TensorBoard


def _record(step: int) -> dict:
    return {"step": step, "loss": 1.0 / step, "lr": 1e-3, "steps_per_s": 1.0, "images_per_s": 1.0}


def _full_event_files(monkeypatch) -> None:
    from tensorboard.compat.tensorflow_stub.io.gfile import LocalFileSystem

    def full(self, filename, content, mode):
        raise OSError(errno.ENOSPC, FULL)

    monkeypatch.setattr(LocalFileSystem, "_write", full)


def _join_writer_threads() -> None:
    from tensorboard.summary.writer.event_file_writer import _AsyncWriterThread

    for t in threading.enumerate():
        if isinstance(t, _AsyncWriterThread):
            t.join(timeout=10)


@pytest.mark.parametrize("when", ["start", "mid-run"])
def test_a_full_disk_under_tensorboard_names_the_tb_directory_without_a_thread_traceback(tmp_path, capfd,
                                                                                        monkeypatch, when):
    """The writer thread printed "Exception in thread ... OSError: [Errno 28]" and zoo's error named no path."""
    from zoo.training.monitor import Monitor

    monkeypatch.setattr(threading, "excepthook", threading.__excepthook__)  # Python's own print (not pytest's)
    run = tmp_path / "run"
    run.mkdir()
    monitor = Monitor(run, 0, 100, log=lambda line: None, tty=False)
    step = 1
    if when == "mid-run":
        monitor.record(_record(step))
        step += 1
    _full_event_files(monkeypatch)
    with pytest.raises(OSError) as raised:
        for step in range(step, step + 50):  # the thread's error comes out at the next write or flush
            monitor.record(_record(step))
    _join_writer_threads()
    errors = [raised.value]
    if when == "mid-run":  # a writer was opened: its final flush says the same
        with pytest.raises(OSError) as closing:
            monitor.close()
        _join_writer_threads()
        errors.append(closing.value)
    else:
        monitor.close()
    for err in errors:
        assert (err.errno, err.filename) == (errno.ENOSPC, str(run / "tb"))
    printed = capfd.readouterr().err
    assert "Traceback" not in printed and "Exception in thread" not in printed


def test_other_threads_errors_still_reach_the_excepthook(monkeypatch):
    from zoo.training.monitor import _quiet_tensorboard_thread

    seen = []
    monkeypatch.setattr(threading, "excepthook", lambda args: seen.append(args.exc_value))
    _quiet_tensorboard_thread()
    _quiet_tensorboard_thread()  # once: not a second wrapper

    def fail():
        raise OSError(errno.ENOSPC, FULL)

    t = threading.Thread(target=fail)
    t.start()
    t.join()
    assert len(seen) == 1 and seen[0].errno == errno.ENOSPC


# ----------------------------------------------------------------------------- a writer's clean-up hiding the error


def _full_then_cleanup_fails(tmp) -> None:
    """As matplotlib's PDF backend: ENOSPC, then its clean-up raises AttributeError while handling it."""
    Path(tmp).write_bytes(b"half a pdf")
    try:
        raise OSError(errno.ENOSPC, FULL)
    except OSError:
        raise AttributeError("'Stream' object has no attribute 'pos'")


def test_a_full_disk_hidden_by_a_writers_cleanup_error_names_the_file(tmp_path):
    out = tmp_path / "c.pdf"
    with pytest.raises(OSError) as raised:
        atomic.write_file(out, _full_then_cleanup_fails)
    assert (raised.value.errno, raised.value.filename) == (errno.ENOSPC, str(out))
    assert list(tmp_path.iterdir()) == []


def test_disk_error_walks_the_chain_but_not_past_from_none_or_into_an_interrupt():
    try:
        try:
            raise OSError(errno.EROFS, "Read-only file system")
        except OSError as err:
            raise RuntimeError("wrapped") from err
    except RuntimeError as err:
        assert atomic.disk_error(err, "x").errno == errno.EROFS
    try:
        try:
            raise OSError(errno.ENOSPC, FULL)
        except OSError:
            raise ValueError("not the disk") from None
    except ValueError as err:
        assert atomic.disk_error(err, "x") is None
    try:
        try:
            raise OSError(errno.ENOSPC, FULL)
        except OSError:
            raise KeyboardInterrupt
    except KeyboardInterrupt as err:
        assert atomic.disk_error(err, "x") is None


def test_compare_plot_on_a_full_disk_is_one_line(tmp_path, capsys, monkeypatch):
    """matplotlib's PDF clean-up raised AttributeError over the ENOSPC: a traceback, exit 1."""
    from matplotlib.figure import Figure

    monkeypatch.setattr(Figure, "savefig", lambda self, tmp, **kwargs: _full_then_cleanup_fails(tmp))
    out = tmp_path / "c.pdf"
    code, err = _cli(capsys, "compare", RECIPES / "tiny_train.yaml", RECIPES / "tiny_dimr_pixels.yaml", "--no-time",
                     "--plot", out)
    assert code == 2 and "Traceback" not in err
    assert err.splitlines()[-1].startswith(f"zoo: error: {out}: the disk is full")
    assert not out.exists() and not list(tmp_path.glob(".c.pdf.tmp-*"))


# ----------------------------------------------------------------------------- reading a read-only run

RECIPE = {
    "model": {"type": "dit", "input_size": 8, "patch_size": 2, "in_channels": 4, "hidden_size": 32,
              "depth": 2, "num_heads": 2, "num_classes": 10},
    "train": {"steps": 10, "batch_size": 2, "lr": 1e-4, "ckpt_every": 0, "sample_every": 0, "log_every": 0},
}  # fmt: skip


def _model(seed: int) -> torch.nn.Module:
    import zoo

    torch.manual_seed(seed)
    model = zoo.build_model(RECIPE)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return model


def _read_only_run_killed_before_install(tmp_path: Path) -> tuple[Path, Path, torch.nn.Module]:
    """``run/last`` (step 1) and a sealed ``run/last.tmp-*`` (step 2): killed between sealing and installing."""
    run = tmp_path / "run"
    ckpt.save_checkpoint(run / "last", _model(1), RECIPE, state={"step": 1})
    newer = _model(2)
    ckpt.save_checkpoint(tmp_path / "newer", newer, RECIPE, state={"step": 2})
    sealed = run / "last.tmp-0123abcd"
    shutil.copytree(tmp_path / "newer", sealed)
    assert atomic.is_sealed(sealed, ckpt.CONFIG)
    return run, sealed, newer


def _refuse_renames(monkeypatch, refused=lambda src: True, code: int = errno.EROFS) -> list:
    """zoo's renames of the paths ``refused`` picks fail with ``code``; the others happen. The refused tries."""
    tried, real_replace = [], os.replace

    def replace(src, dst):
        if not refused(Path(src)):
            return real_replace(src, dst)
        tried.append((src, dst))
        raise OSError(code, os.strerror(code), str(src))

    monkeypatch.setattr(atomic.os, "replace", replace)
    return tried


def _tree(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


def test_a_read_only_run_is_read_from_the_sealed_save_in_place(tmp_path, monkeypatch, capsys):
    """Reading it failed with "run/last: the file system is read-only": the repair had to rename."""
    from zoo.guards import resolve_sample_source
    from zoo.integrations.checkpoints import load_preferred

    run, sealed, newer = _read_only_run_killed_before_install(tmp_path)
    before = _tree(run)
    tried = _refuse_renames(monkeypatch)
    assert ckpt.checkpoint_of(run) == sealed
    assert resolve_sample_source(str(run)) == str(sealed)  # zoo sample
    model, _, weights = load_preferred(run)
    assert weights == "model"
    for key, value in newer.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    assert tried and _tree(run) == before  # nothing renamed, nothing deleted
    assert capsys.readouterr().err.count("zoo: note:") == 1

    # a writer (zoo train into the run) still stops: it needs last/ installed
    with pytest.raises(OSError) as raised:
        ckpt.repair_run(run)
    assert raised.value.errno == errno.EROFS


def test_zoo_eval_of_a_read_only_run_reads_the_sealed_save_in_place(tmp_path, monkeypatch):
    """eval's locate named run/last whatever the repair had found: the older weights, or on a really
    read-only mount the repair's rename failure."""
    from zoo.eval.runner import locate

    run, sealed, _ = _read_only_run_killed_before_install(tmp_path)
    _refuse_renames(monkeypatch)
    assert locate(run) == (sealed, run / "eval")
    assert locate(run / "last") == (sealed, run / "eval")  # the checkpoint named: its newer save, too


def test_a_resume_from_a_read_only_run_into_another_out_continues_from_its_sealed_save(tmp_path, capsys,
                                                                                       monkeypatch):
    """--resume RO_RUN --out NEW stopped with "RO_RUN/last: the file system is read-only": the resume
    repaired the run it only reads like the run it writes."""
    small = ["--set", "train.ckpt_every=0", "--set", "train.sample_every=0", "--set", "train.log_every=1"]
    first, later = tmp_path / "first", tmp_path / "later"
    assert _cli(capsys, "train", RECIPES / "tiny_train.yaml", "--out", first, "--steps", "2", *small)[0] == 0
    assert _cli(capsys, "train", RECIPES / "tiny_train.yaml", "--resume", first, "--out", later, "--steps", "4",
                *small)[0] == 0
    sealed = first / "last.tmp-0123abcd"  # killed between sealing step 4 and installing it as last/
    shutil.copytree(later / "last", sealed)
    _refuse_renames(monkeypatch, lambda src: src.parent == first)
    code, err = _cli(capsys, "train", RECIPES / "tiny_train.yaml", "--resume", first, "--out", tmp_path / "again",
                     "--steps", "5", *small)
    assert code == 0, err
    records = [json.loads(line) for line in (tmp_path / "again" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [5]  # one step after the sealed step 4, not three after last/'s 2
    assert ckpt.load_trainer_state(tmp_path / "again" / "last")["step"] == 5
    assert sealed.is_dir() and (first / "last").is_dir()  # nothing of the read-only run renamed


def test_a_writable_run_is_still_repaired_by_a_reader(tmp_path):
    run, sealed, newer = _read_only_run_killed_before_install(tmp_path)
    assert ckpt.checkpoint_of(run) == run / "last"
    assert not sealed.exists() and sorted(p.name for p in run.iterdir()) == ["last"]
    assert torch.equal(load_weights(run / "last" / ckpt.MODEL)["x_embedder.proj.weight"],
                       newer.state_dict()["x_embedder.proj.weight"])


def test_a_reader_refused_only_the_second_rename_puts_the_first_back(tmp_path, monkeypatch):
    """A sticky directory may allow moving last/ aside but not the other's copy into place."""
    run, sealed, _ = _read_only_run_killed_before_install(tmp_path)
    before = _tree(run)
    _refuse_renames(monkeypatch, lambda src: ".tmp-" in src.name, errno.EPERM)
    assert ckpt.checkpoint_of(run) == sealed
    assert _tree(run) == before
