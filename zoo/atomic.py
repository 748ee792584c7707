"""Crash-safe writes: a file or a checkpoint directory appears whole, or not at all.

**A file** is written as ``.NAME.tmp-XXXXXXXX`` beside it, flushed to disk, then renamed over
``NAME`` (one atomic rename).

**A directory** ``DIR`` (a checkpoint) is replaced by this protocol; each step is named, and a
crash may stop it anywhere:

1. ``fill``      make ``DIR.tmp-X`` and write its files, each flushed to disk;
2. ``seal``      write its *record* (a JSON file, e.g. ``config.json``) last, listing every other
   file and its size, and flush it and the directory. A sealed directory is complete: this is
   the commit point of the save;
3. ``set-aside`` rename the current ``DIR`` to ``DIR.old-Y`` (if there is one);
4. ``install``   rename ``DIR.tmp-X`` to ``DIR`` and flush the parent directory;
5. ``discard``   delete ``DIR.old-Y``.

:func:`repair` puts any interrupted state right, keeping the newest complete checkpoint: a
sealed ``DIR.tmp-*`` (the save passed its commit point) rolls forward into ``DIR``; otherwise
``DIR`` stays as it is (the save stopped before its seal); and if ``DIR`` is gone, the newest
``DIR.old-*`` comes back. The other leftovers are deleted. It runs before every save and when a
run starts, resumes or is sampled. Only names of the exact forms ``DIR.tmp-XXXXXXXX``,
``DIR.old-XXXXXXXX``, ``.NAME.tmp-XXXXXXXX`` and ``.NAME.del-XXXXXXXX`` (8 hex digits; the last
from :func:`delete_dir`) are ever deleted, and a ``DIR``
without a readable record is never moved. While a save or a repair runs it
holds an exclusive lock on the parent directory (where the OS has ``flock``), so a sampler's
repair never deletes the half-written directory of a trainer saving next to it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

_LEFTOVER = re.compile(r"^(?P<name>.+)\.(?P<kind>tmp|old)-[0-9a-f]{8}$")
_FILE_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?:tmp|del)-[0-9a-f]{8}$")
FILES_KEY, STAMP_KEY = "files", "written_ns"


#: Errors of where a file goes, not of what it holds: a full disk, a used-up quota, a read-only file system,
#: a file size limit (``ulimit -f``, or the file system's largest file).
DISK_ERRNOS = frozenset(code for code in (errno.ENOSPC, getattr(errno, "EDQUOT", None), errno.EROFS, errno.EFBIG)
                        if code)
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how safetensors words the OS error under its own


def disk_error(err: BaseException, target: str | Path) -> OSError | None:
    """``err`` as an ``OSError`` naming ``target`` if it is a full or read-only disk (also as
    safetensors or torch wrap it, or as the error a writer's clean-up raised while handling it:
    matplotlib's PDF writer), else ``None``. A writer's own message names its temporary file,
    which is gone by then, or no file at all."""
    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        code = cause.errno if isinstance(cause, OSError) else None
        if code is None and (found := _RUST_OS_ERROR.search(str(cause))):
            code = int(found[1])
        if code in DISK_ERRNOS:
            return OSError(code, os.strerror(code), str(target))
        if not isinstance(err, Exception):  # an interrupt in a handler is an interrupt, not the disk
            return None
        cause = cause.__cause__ or (None if cause.__suppress_context__ else cause.__context__)
    return None


@contextlib.contextmanager
def disk_errors_named(target: str | Path) -> Iterator[None]:
    """Re-raise a full or read-only disk under the block as :func:`disk_error` names it (``target``)."""
    try:
        yield
    except OSError as err:
        if (named := disk_error(err, target)) is not None:
            raise named from err
        raise


def write_all(raw: Any, data: bytes | memoryview) -> int:
    """Write every byte of ``data`` to an unbuffered file, whose ``write`` may take fewer, or raise."""
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        done += raw.write(view[done:])
    return done


def _reached(step: str, path: Path) -> None:
    """Called as the directory protocol reaches each step; tests replace it to stop a save there."""


def _suffix() -> str:
    return uuid.uuid4().hex[:8]


def _read_umask() -> int:
    mask = os.umask(0o022)  # the only way to read it; put back at once (module import, before any thread writes)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def plain_mode(path: Path) -> None:
    """Give a written file the permissions ``open(path, "w")`` would (0666 less the umask).

    Writers that create their output with a private mode (safetensors: 0600) would otherwise
    leave checkpoints and latent shards that other users of a shared disk cannot read.
    """
    with contextlib.suppress(OSError):
        os.chmod(path, 0o666 & ~_UMASK)


def fsync_path(path: Path) -> None:
    """Flush a file or a directory to disk (directories: where the OS allows opening them)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def locked(directory: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``directory`` for the duration (a no-op where there is none)."""
    try:
        import fcntl

        fd = os.open(directory, os.O_RDONLY)
    except (ImportError, OSError):
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        os.close(fd)  # closing releases the lock


# ----------------------------------------------------------------------------- files


def write_file(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """``write(tmp)`` a file beside ``path``, flush it, rename it over ``path``; return ``path``."""
    from zoo.errors import UserError

    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a directory; give the path of a file to write")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_file_leftovers(path, untouched_for=STALE_AFTER_S)  # a killed earlier write's; never a live one's
    tmp = path.with_name(f".{path.name}.tmp-{_suffix()}")
    written = False
    try:
        write(tmp)
        written = True
        plain_mode(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
    except Exception as err:
        if (named := disk_error(err, path)) is not None:
            raise named from err
        if written and isinstance(err, FileNotFoundError) and not os.path.lexists(tmp):
            raise UserError(f"{path} was not written: its temporary file {tmp.name} was removed meanwhile by another "
                            "process (one that took it for a killed write's leftover, or that writes the same file)",
                            suggestion="run again, with no other process writing there") from None
        raise
    finally:
        if os.path.lexists(tmp):  # (unlinking a name that is not there fails on a read-only file system)
            tmp.unlink(missing_ok=True)  # nothing half-written is left
    fsync_path(path.parent)
    return path


def is_leftover(name: str) -> bool:
    """Whether ``name`` is one of a save's temporary names (``.NAME.tmp-X``, ``.NAME.del-X``, ``DIR.tmp-X``,
    ``DIR.old-X``): zoo's own, for a check of which files in a directory a user put there."""
    return bool(_FILE_LEFTOVER.match(name) or _LEFTOVER.match(name))


def file_leftovers(directory: str | Path) -> dict[str, list[Path]]:
    """The ``.NAME.tmp-XXXXXXXX`` files killed :func:`write_file` calls left in ``directory``, by NAME."""
    found: dict[str, list[Path]] = {}
    directory = Path(directory)
    if directory.is_dir():
        for p in sorted(directory.glob(".*.tmp-*")):
            if (m := _FILE_LEFTOVER.match(p.name)) and p.is_file():
                found.setdefault(m["name"], []).append(p)
    return found


#: How long a ``.NAME.tmp-*`` file must have been left untouched to count as a killed write's: a live writer
#: touches its file as it writes, and even fsync of a large file on a slow network file system ends sooner.
STALE_AFTER_S = 15 * 60


def remove_file_leftovers(path: str | Path, untouched_for: float = 0.0) -> None:
    """Delete the ``.NAME.tmp-XXXXXXXX`` files a killed :func:`write_file` of ``path`` left beside it.

    With ``untouched_for=0`` only for a writer that knows no other process is writing ``path`` at the
    moment; else only the files not modified for that many seconds (caches several processes may fill).
    """
    path = Path(path)
    now = time.time()
    for p in file_leftovers(path.parent).get(path.name, []):
        try:
            if untouched_for <= 0 or now - p.stat().st_mtime >= untouched_for:
                p.unlink(missing_ok=True)
        except OSError:  # gone meanwhile, or not ours to delete (a read-only cache): left as it is
            continue


def write_text(path: str | Path, text: str) -> Path:
    """Write a text file atomically (UTF-8)."""
    return write_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


# ----------------------------------------------------------------------------- directories


def read_record(directory: Path, record: str) -> dict | None:
    """The JSON object in ``directory/record``, or ``None`` if it is missing or not a JSON object."""
    try:
        payload = json.loads((directory / record).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return payload if isinstance(payload, dict) else None


def missing_or_truncated(directory: Path, record: str) -> list[str] | None:
    """Problems with the files a sealed directory's record lists (``[]``: complete); ``None`` if unsealed."""
    payload = read_record(directory, record)
    files = payload.get(FILES_KEY) if payload else None
    if not isinstance(files, dict):
        return None
    problems = []
    for name, size in files.items():
        f = directory / name
        if not f.is_file():
            problems.append(f"{name} is missing")
        elif f.stat().st_size != size:
            problems.append(f"{name} has {f.stat().st_size} bytes, {record} says {size} (truncated or changed)")
    return problems


def unlisted_files(directory: Path, record: str) -> list[str]:
    """The names in a directory :func:`write_dir` sealed that its record does not list: files a user put
    there since, which replacing the directory would delete. Sorted; ``[]`` for an unsealed directory."""
    files = (read_record(directory, record) or {}).get(FILES_KEY)
    if not isinstance(files, dict):
        return []
    return sorted(p.name for p in directory.iterdir() if p.name != record and p.name not in files)


def is_sealed(directory: Path, record: str) -> bool:
    """Whether ``directory`` was completely written by :func:`write_dir` (its record lists every file)."""
    return directory.is_dir() and missing_or_truncated(directory, record) == []


def sealed_at(directory: Path, record: str) -> int:
    """When :func:`write_dir` sealed ``directory`` (ns since the epoch), or -1 if it did not."""
    payload = read_record(directory, record) or {}
    stamp = payload.get(STAMP_KEY)
    return stamp if isinstance(stamp, int) else -1


def _remove(path: Path) -> None:
    if not os.path.lexists(path):  # (unlinking a name that is not there fails on a read-only file system)
        return
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def delete_dir(path: str | Path) -> None:
    """Delete a directory zoo wrote: renamed to ``.NAME.del-XXXXXXXX`` first, so a crash mid-delete
    leaves a leftover that :func:`repair_all` removes, never half a directory under its name."""
    path = Path(path)
    if not path.is_dir():
        return
    doomed = path.with_name(f".{path.name}.del-{_suffix()}")
    os.replace(path, doomed)
    fsync_path(path.parent)
    _remove(doomed)


def leftovers(target: Path) -> list[Path]:
    """``target.tmp-*`` and ``target.old-*`` beside ``target`` (exact protocol names only), sorted."""
    parent = target.parent
    if not parent.is_dir():
        return []
    try:
        names = list(parent.iterdir())
    except PermissionError:  # a folder one may enter but not list (a shared home, 711): none to see or repair
        return []
    return sorted(p for p in names if (m := _LEFTOVER.match(p.name)) and m["name"] == target.name)


def saved_name(path: Path) -> str:
    """The directory a save's leftover ``DIR.tmp-X`` / ``DIR.old-Y`` stands for (``DIR``), else ``path``'s own name."""
    m = _LEFTOVER.match(path.name)
    return m["name"] if m else path.name


def _kind(path: Path) -> str:
    return _LEFTOVER.match(path.name)["kind"]


def _newest(paths: list[Path], record: str) -> Path | None:
    return max(paths, key=lambda p: (sealed_at(p, record), p.name)) if paths else None


def _choose(target: Path, found: list[Path], record: str) -> Path | None:
    """Which directory becomes ``target``: a sealed new copy, else ``target`` itself, else the previous one."""
    sealed_new = _newest([p for p in found if _kind(p) == "tmp" and is_sealed(p, record)], record)
    if sealed_new is not None and (not target.exists() or read_record(target, record) is not None):
        return sealed_new  # the save passed its seal: roll forward
    if target.exists():
        return target  # the save stopped before its seal, or DIR is not ours to move: roll back
    previous = [p for p in found if _kind(p) == "old" and read_record(p, record) is not None]
    # an old copy was a whole DIR when it was set aside; prefer one whose files are all still there
    return _newest([p for p in previous if is_sealed(p, record)] or previous, record)


#: A rename a reader is refused: a read-only copy of a run, or a directory that is not the reader's to change.
REFUSED_RENAME_ERRNOS = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})
_NOTED: set[tuple[Path, Path]] = set()


def _repair_unlocked(target: Path, record: str, in_place: bool = False) -> Path | None:
    found = leftovers(target)
    if not found:
        return None
    winner = _choose(target, found, record)
    if winner is not None and winner != target:
        aside = None
        try:
            if target.exists():
                name = target.with_name(f"{target.name}.old-{_suffix()}")
                os.replace(target, name)
                found.append(aside := name)
            os.replace(winner, target)
        except OSError as err:
            if not in_place or err.errno not in REFUSED_RENAME_ERRNOS:
                raise
            if aside is not None:  # the first rename was allowed, the second not: undone
                os.replace(aside, target)
            return winner  # read where it is: nothing renamed, nothing deleted
        fsync_path(target.parent)
        found.remove(winner)
    for p in found:
        _remove(p)
    return target if target.exists() else None


def repair(target: str | Path, record: str, in_place: bool = False) -> Path | None:
    """Finish or undo an interrupted :func:`write_dir` of ``target``; return ``target`` if it exists after.

    Without leftovers this only lists the parent directory. ``record`` is the sealing file's name.
    ``in_place`` (a reader's repair): where the renames are refused (a read-only copy of a run), nothing
    is changed and the directory the repair would have installed is returned to be read where it is.
    """
    target = Path(target)
    if not leftovers(target):
        return target if target.exists() else None
    with locked(target.parent):
        chosen = _repair_unlocked(target, record, in_place)
    if chosen is not None and chosen != target:
        if (target, chosen) not in _NOTED:
            _NOTED.add((target, chosen))
            print(f"zoo: note: {target} cannot be repaired here (its file system refuses the rename): reading "
                  f"{chosen.name}, the save that would replace it, where it is", file=sys.stderr)
        return chosen
    return target if target.exists() else None


def repair_all(directory: str | Path, record: str, ours: Callable[[str], bool] = lambda name: True,
               files: bool = True) -> list[Path]:
    """:func:`repair` every interrupted directory save and delete temporary files in ``directory``.

    ``ours(NAME)`` limits both to the names the caller writes there (``last``, ``log.jsonl``): a
    folder that also holds a user's ``notes.old-0123abcd`` keeps it. ``files=False`` leaves the
    temporary files alone (another process may be writing them: :func:`write_file` takes no lock).
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    repaired = []
    with locked(directory):
        for p in sorted(directory.iterdir()) if files else ():
            m = _FILE_LEFTOVER.match(p.name)
            if m and ours(m["name"]) and (p.is_file() or ".del-" in p.name):
                _remove(p)
        names = {m["name"] for p in directory.iterdir() if (m := _LEFTOVER.match(p.name)) and ours(m["name"])}
        for name in sorted(names):
            if _repair_unlocked(directory / name, record) is not None:
                repaired.append(directory / name)
    return repaired


def write_dir(target: str | Path, fill: Callable[[Path], None], record: str,
              payload: Mapping[str, Any], replace: Callable[[Path], None] | None = None) -> Path:
    """Write the directory ``target`` by the protocol above and return it.

    ``fill(tmp)`` writes every file but the record; ``payload`` is the record's JSON object
    (``files`` and ``written_ns`` are added). ``replace(target)``, if given, is called before an
    existing ``target`` is replaced and may raise to refuse (nothing is written then).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with locked(target.parent):
        _repair_unlocked(target, record)
        if target.exists() and replace is not None:
            replace(target)
        tmp = target.with_name(f"{target.name}.tmp-{_suffix()}")
        try:
            tmp.mkdir()
            _reached("fill", tmp)
            fill(tmp)
            files = {}
            for f in sorted(tmp.iterdir()):
                if f.is_file():
                    plain_mode(f)
                fsync_path(f)
                files[f.name] = f.stat().st_size
            _reached("seal", tmp)
            sealed = {**payload, FILES_KEY: files, STAMP_KEY: time.time_ns()}
            (tmp / record).write_text(json.dumps(sealed, indent=2) + "\n", encoding="utf-8")
            fsync_path(tmp / record)
            fsync_path(tmp)
        except BaseException as err:
            _remove(tmp)  # not sealed: the save never happened
            if (named := disk_error(err, target)) is not None:
                raise named from err
            raise
        try:  # sealed: from here on an interruption rolls forward (repair installs tmp)
            old = None
            if target.exists():
                _reached("set-aside", tmp)
                old = target.with_name(f"{target.name}.old-{_suffix()}")
                os.replace(target, old)
            _reached("install", tmp)
            os.replace(tmp, target)
            fsync_path(target.parent)
            if old is not None:
                _reached("discard", old)
                _remove(old)
        except BaseException:
            _repair_unlocked(target, record)
            raise
    return target
