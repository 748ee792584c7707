"""One ``zoo train`` at a time in a run directory.

Two runs started into the same ``--out`` both trained and both reported success, while their
checkpoints replaced each other and their records interleaved in ``log.jsonl``. Rank 0 of a run
holds an exclusive ``flock`` on ``RUN/.zoo-train.lock`` while it runs; a second run stops at its
start with the first one's process id. The file is deleted when the run ends; the kernel drops the
lock when the process ends however it ends (a SIGKILL included), so a file a killed run left behind
never blocks a later run. Where ``fcntl`` does not exist (Windows) there is no lock.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from zoo.atomic import disk_errors_named
from zoo.errors import UserError

LOCK_FILE = ".zoo-train.lock"


class RunLock:
    """The exclusive lock of one run directory, held from :meth:`acquire` to :meth:`release`."""

    def __init__(self, out: Path) -> None:
        self.path = Path(out) / LOCK_FILE
        self.fd: int | None = None
        self.unlocked: str | None = None  # why the run goes unlocked (its file system has no locks), said once

    def acquire(self) -> None:
        """Take the lock, or raise :class:`UserError` naming the process that holds it."""
        try:
            import fcntl
        except ImportError:
            return
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                err = _held(fd, self.path)
                os.close(fd)
                raise err from None
            except OSError as err:  # a file system without flock (some network mounts): run unlocked, leave no file
                os.close(fd)
                self.path.unlink(missing_ok=True)
                self.unlocked = (f"{self.path.parent}'s file system does not lock files ({err.strerror or err}): "
                                 "a second zoo train into it is not refused, and would replace this run's "
                                 "checkpoints and mix their logs; start one run per --out")
                return
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:  # not a file the previous holder unlinked as this process opened it
                break
            os.close(fd)
        with disk_errors_named(self.path):  # a full disk: a line naming the file, and no file left behind
            try:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode("ascii"))
            except OSError:
                with contextlib.suppress(OSError):
                    self.path.unlink(missing_ok=True)
                os.close(fd)
                raise
        self.fd = fd

    def release(self) -> None:
        """Delete the file, then drop the lock (a run waiting on the old file then sees it gone and retries)."""
        if self.fd is not None:
            try:
                self.path.unlink(missing_ok=True)
            except OSError:
                pass
            os.close(self.fd)
            self.fd = None


def check_unlocked(out: Path) -> None:
    """Raise what :meth:`RunLock.acquire` would if a run holds ``out``'s lock now, taking nothing.

    For a ``--resume`` into ``out``, before it reads checkpoints: a live run there may be replacing
    them meanwhile (a step directory pruned under the reader), which gave "file not found" instead."""
    try:
        import fcntl
    except ImportError:
        return
    path = Path(out) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # no lock file: no run holds it
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # dropped again when fd closes
    except BlockingIOError:
        raise _held(fd, path) from None
    except OSError:  # a file system without flock
        pass
    finally:
        os.close(fd)


def _held(fd: int, path: Path) -> UserError:
    holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
    return UserError(f"another zoo train (pid {holder}) is writing {path.parent}; two runs there "
                     "would replace each other's checkpoints and mix their logs",
                     suggestion="wait for it to end, or choose another --out")
