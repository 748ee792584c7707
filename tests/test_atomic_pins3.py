"""Pins on zoo.atomic's crash-safe writes that the checkpoint tests did not hold: which copy a repair
installs when several are left (the newest sealed save, a complete set-aside copy), that a directory
without a record is never moved, that a write leaves a live writer's temporary file alone, and that a
file is replaced by a rename (a reader holding the old file keeps it whole)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from zoo import atomic

pytestmark = pytest.mark.usefixtures("one_thread")

RECORD = "rec.json"


def _sealed(path: Path, files: dict[str, bytes], stamp: int, extra: dict | None = None) -> Path:
    """A directory as write_dir seals it: its files, then a record listing them with ``written_ns=stamp``."""
    path.mkdir()
    for name, data in files.items():
        (path / name).write_bytes(data)
    record = {**(extra or {}), atomic.FILES_KEY: {n: len(d) for n, d in files.items()}, atomic.STAMP_KEY: stamp}
    (path / RECORD).write_text(json.dumps(record), encoding="utf-8")
    return path


def _names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_repair_installs_the_newest_of_two_sealed_saves(tmp_path):
    """Two sealed DIR.tmp-* (two killed saves): the later seal wins; a repair taking the older one would
    put an earlier step's weights back under last/."""
    _sealed(tmp_path / "last.tmp-ffffffff", {"w": b"old"}, stamp=1_000)  # older, but the larger name
    _sealed(tmp_path / "last.tmp-00000000", {"w": b"new"}, stamp=2_000)
    assert atomic.repair(tmp_path / "last", RECORD) == tmp_path / "last"
    assert _names(tmp_path) == ["last"]
    assert (tmp_path / "last" / "w").read_bytes() == b"new"


def test_repair_never_moves_a_directory_without_a_record(tmp_path):
    """A DIR without a readable record is not zoo's to replace: a sealed DIR.tmp-* beside it is dropped, and
    DIR (a user's folder) keeps its files; an implementation installing the save would delete them."""
    target = tmp_path / "last"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    _sealed(tmp_path / "last.tmp-0123abcd", {"w": b"new"}, stamp=1)
    assert atomic.repair(target, RECORD) == target
    assert _names(tmp_path) == ["last"]
    assert _names(target) == ["notes.txt"] and (target / "notes.txt").read_text() == "mine"


def test_repair_restores_the_complete_set_aside_copy_over_a_newer_damaged_one(tmp_path):
    """DIR gone, two DIR.old-* left: one whose files are all there wins over a later-sealed one missing a
    file; preferring the newest regardless would install a checkpoint that cannot be loaded."""
    _sealed(tmp_path / "last.old-0000000a", {"w": b"whole"}, stamp=1_000)
    damaged = _sealed(tmp_path / "last.old-0000000b", {"w": b"later"}, stamp=2_000)
    (damaged / "w").unlink()
    assert atomic.repair(tmp_path / "last", RECORD) == tmp_path / "last"
    assert _names(tmp_path) == ["last"]
    assert (tmp_path / "last" / "w").read_bytes() == b"whole"
    assert atomic.is_sealed(tmp_path / "last", RECORD)


def test_write_file_leaves_a_live_writers_temporary_file_and_removes_a_stale_one(tmp_path):
    """write_file clears only leftovers untouched for STALE_AFTER_S: deleting a fresh one would pull the
    file from under another process writing the same path (a shared cache) and fail its rename."""
    path = tmp_path / "stats.json"
    live = tmp_path / ".stats.json.tmp-0123abcd"
    stale = tmp_path / ".stats.json.tmp-4567cdef"
    live.write_text("being written")
    stale.write_text("killed")
    old = time.time() - atomic.STALE_AFTER_S - 60
    os.utime(stale, (old, old))
    atomic.write_text(path, "{}")
    assert path.read_text() == "{}"
    assert live.exists() and not stale.exists()


def test_write_file_replaces_by_rename_so_an_open_reader_keeps_the_old_file(tmp_path):
    """The new content goes to a new file renamed over the name: a reader that opened (here: linked) the
    old file keeps it whole. Writing into the existing file instead would change it under the reader."""
    path = tmp_path / "log.jsonl"
    atomic.write_text(path, "old\n")
    held = tmp_path / "held"
    os.link(path, held)  # the old inode, as an open reader holds it
    atomic.write_text(path, "new\n")
    assert path.read_text() == "new\n"
    assert held.read_text() == "old\n"


def test_repair_of_one_directory_leaves_a_longer_names_leftovers_alone(tmp_path):
    """Repairing step_1 must not take step_10.tmp-* for its own save: matching by prefix would install the
    step-10 save under step_1/ (and delete step_1's own weights)."""
    _sealed(tmp_path / "step_1", {"w": b"one"}, stamp=1_000)
    _sealed(tmp_path / "step_10.tmp-0123abcd", {"w": b"ten"}, stamp=2_000)
    assert atomic.repair(tmp_path / "step_1", RECORD) == tmp_path / "step_1"
    assert (tmp_path / "step_1" / "w").read_bytes() == b"one"
    assert _names(tmp_path) == ["step_1", "step_10.tmp-0123abcd"]  # step_10's own repair rolls it forward
