"""Checks a command makes before it reads or writes anything: the device, output paths, a sample source.

Each failure is one :class:`~zoo.errors.UserError` naming the option and the fix. Output checks
are what keeps the promise that no command deletes or replaces anything it did not create.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from zoo.errors import UserError, some_of

if TYPE_CHECKING:  # torch is imported where a device is resolved: the CLI's parser, which takes user_path, needs none
    import torch

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RECIPE_SUFFIXES = (".yaml", ".yml")
WEIGHTS_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors")  # weights files, official or not
NOT_A_SOURCE_SUFFIXES = (*WEIGHTS_SUFFIXES, ".json", ".png", ".jpg")


def resolve_device(name: str | None, option: str = "--device") -> torch.device:
    """The device a ``--device`` value (or a ``torch.device``) names (default: cuda if available, else cpu),
    checked to exist here; ``option`` is how the caller spelled the argument, for the messages."""
    import torch

    if name is None or str(name).strip() == "":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(str(name).strip())
    except (RuntimeError, ValueError):
        raise UserError(f"{option} {name!r} is not a device", suggestion="use cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    to_cpu = f"use {option} cpu" if option.startswith("--") else f"use {option}'cpu'"  # the CLI's or Python's spelling
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"{option} {name}: no CUDA GPU is available on this machine", suggestion=to_cpu)
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UserError(f"{option} {name}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
        return device
    if device.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise UserError(f"{option} {name}: Apple MPS is not available on this machine", suggestion=to_cpu)
        return device
    raise UserError(f"{option} {name!r}: zoo runs on cpu, cuda or mps, not {device.type}",
                    suggestion="use cpu, cuda or cuda:N")


def check_parents(path: Path, option: str) -> None:
    """The nearest existing ancestor of ``path`` must be a directory (so it can be created there)."""
    for parent in path.parents:
        if parent.is_symlink() and not parent.exists():  # a link to nothing: mkdir there says "File exists"
            raise UserError(f"{option} {path}: {parent} is a symbolic link to {os.readlink(parent)}, which does not "
                            "exist", suggestion="create its target, or choose another path")
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{option} {path}: {parent} is a file, not a directory")
            return


def user_path(text: str | Path) -> Path:
    """A path option's value with ``~`` expanded (an argparse ``type``): bash leaves ``--out=~/x`` as it is.
    (``os.path``'s: a ``~user`` that does not exist stays as written, for the path's own error.) A ``~`` that
    stays (``./~/x``, a folder of that name) is anchored to the current directory: ``Path`` drops the ``./``,
    and a later ``expanduser`` would take the home directory for it."""
    path = Path(os.path.expanduser(text))
    return Path.cwd() / path if path.parts and path.parts[0].startswith("~") else path


def check_writable(path: Path, option: str = "--out", into: bool = False, suggestion: str | None = None) -> None:
    """Refuse, before any work is spent, an output ``path`` zoo could not write: a file among its
    parents, or a nearest existing directory where no file can be made (a read-only file system, no
    permission); ``into``: files go inside ``path`` itself where it is a directory. Probed by
    making a temporary file, deleted again."""
    check_parents(path, option)
    where = path if into and path.is_dir() else next((p for p in path.parents if p.is_dir()), Path("."))
    try:
        _probe(where)
    except OSError as err:
        raise UserError(f"{option} {path}: cannot write in {_named(where)} ({err.strerror})",
                        suggestion=suggestion or f"choose another {option}") from None


def _probe(directory: Path) -> None:
    """Make and delete a file in ``directory`` (raises the OSError of a directory that takes none)."""
    with tempfile.TemporaryFile(dir=directory, prefix=".zoo-probe-"):
        pass


def check_png_output(path: str | Path, option: str = "--out") -> Path:
    """``path`` for a PNG grid: not a directory, ends in .png, and replaces only a PNG zoo wrote."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise UserError(f"{option} {path} is a directory; give the PNG file to write, e.g. {path / 'grid.png'}")
    if path.suffix.lower() != ".png":
        raise UserError(f"{option} {path}: the grid is written as PNG; give a path ending in .png")
    check_outside_checkpoints(path, option)
    if path.exists():
        try:
            with open(path, "rb") as f:
                head = f.read(len(PNG_MAGIC))
        except OSError as err:
            raise UserError(f"{option} {path} exists and cannot be read ({err.strerror})") from None
        if head != PNG_MAGIC:
            raise UserError(f"{option} {path} exists and is not a PNG image; zoo will not replace it",
                            suggestion="choose another path")
        if not a_zoo_png(path):
            raise UserError(f"{option} {path} exists and is a PNG zoo did not write (no 'Software: zoo' text "
                            "chunk: a user's picture, or one from a zoo older than that chunk); zoo will not replace "
                            "it", suggestion="move it away or choose another path")
    check_writable(path, option)  # before the sampler runs, not after
    return path


def holds_a_run(directory: Path) -> str | None:
    """The checkpoint that shows ``directory`` holds a ``zoo train`` run (``"last/"``, else its newest
    ``"step_0000500/"``), or ``None``: a run that stopped before its first checkpoint may start again.
    A save a kill interrupted (``last.tmp-X`` holding a checkpoint, which the next start rolls forward
    into ``last/``) counts as the checkpoint it was writing."""
    from zoo.atomic import saved_name
    from zoo.checkpoint import CONFIG, RUN_NAMES

    if (directory / "last" / CONFIG).is_file():  # a `last` of the user's (a file, a folder of notes) is no run
        return "last/"
    if not directory.is_dir():
        return None
    # a step_* folder counts when it is a checkpoint (a user's own one does not)
    found = {saved_name(p) for p in directory.iterdir() if RUN_NAMES.fullmatch(saved_name(p)) and (p / CONFIG).is_file()}
    if "last" in found:
        return "last/ (a save a kill interrupted)"
    steps = sorted(found, key=lambda name: int(name.removeprefix("step_")))  # step_10000000 after step_9999999
    return f"{steps[-1]}/" if steps else None


def files_not_from_zoo_train(directory: Path) -> list[str]:
    """All files in ``directory`` that a run there would replace but zoo train did not write (every
    one, so that moving them all away is one step): a ``log.jsonl`` with a line that is not one of
    its records, a ``loss.png`` beside no such log, each ``samples/step_*.png`` that is not one of
    its grids, an ``eval/fd_reference.npz`` that is not its FD reference. (A run that stopped before
    its first checkpoint left a log of its own records: it may start again.)"""
    import json

    log, plot = directory / "log.jsonl", directory / "loss.png"
    found, zoo_log = [], False
    if log.is_file():
        try:
            lines = log.read_text(encoding="utf-8").splitlines()
            records = [json.loads(line) for line in lines if line.strip()]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            records = [None]
        zoo_log = all(isinstance(r, dict) and isinstance(r.get("step"), int)
                      and any(k in r for k in ("loss", "fd", "val_loss")) for r in records)
        found += [] if zoo_log else ["log.jsonl"]
    found += ["loss.png"] if plot.exists() and not zoo_log else []  # (a zoo log's plot is its own)
    found += [f"samples/{p.name}" for p in sorted((directory / "samples").glob("step_*.png")) if not a_zoo_png(p)]
    reference = directory / "eval" / "fd_reference.npz"
    return found + (["eval/fd_reference.npz"] if reference.exists() and not _a_zoo_reference(reference) else [])


def a_zoo_png(path: Path) -> bool:
    """A PNG zoo wrote (its text chunk says so; PIL reads it with the header, not the pixels)."""
    from PIL import Image, UnidentifiedImageError

    from zoo.sample import GRID_SOFTWARE

    try:
        with Image.open(path) as image:
            return getattr(image, "text", {}).get("Software") == GRID_SOFTWARE
    except (OSError, UnidentifiedImageError, ValueError):
        return False


def _a_zoo_reference(path: Path) -> bool:
    """An FD reference zoo train wrote: an npz with its ``identity`` entry."""
    import zipfile

    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as npz:
            return "identity" in npz.files
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return False


def run_of(checkpoint: Path) -> Path:
    """The run directory a ``--resume`` path belongs to (symlinks resolved): itself if it is one,
    else a checkpoint's parent."""
    checkpoint = checkpoint.resolve()
    return checkpoint if holds_a_run(checkpoint) else checkpoint.parent


def enclosing_checkpoint(path: str | Path) -> Path | None:
    """The zoo checkpoint directory ``path`` is, or lies inside (its nearest one), else ``None``.

    Checkpoint directories are replaced whole when saved, and a save refuses to replace one that
    holds anything else: a file written into one would make every later save of it fail.
    """
    from zoo import atomic
    from zoo.checkpoint import CONFIG, FORMAT

    path = Path(path).expanduser()
    above = [] if path.is_absolute() else list(Path.cwd().parents)  # "." is the last of a relative path's parents
    for directory in (path, *path.parents, *above):
        if directory.is_dir() and (atomic.read_record(directory, CONFIG) or {}).get("format") == FORMAT:
            return directory
    return None


def _named(path: Path) -> Path:
    """``path`` as a message shows it: the working directory by name rather than as ``.``."""
    return Path.cwd() if str(path) == "." else path


def check_outside_checkpoints(path: str | Path, option: str = "--out", itself: bool = False) -> None:
    """Refuse an output path that is, or lies inside, a zoo checkpoint directory (written into one,
    a file would make the next save of that checkpoint fail: zoo never replaces a user's files).
    ``itself``: the checkpoint directory itself is allowed (one a command replaces whole with --force)."""
    found = enclosing_checkpoint(path)
    if found is None or (itself and found == Path(path).expanduser()):
        return
    run = _named(found.parent) if holds_a_run(found.parent) else None
    where = f"the run directory {run}, or elsewhere" if run is not None else "a path outside it"
    what = ("is a checkpoint directory" if found == Path(path).expanduser()
            else f"is inside the checkpoint directory {_named(found)}")
    raise UserError(f"{option} {path} {what}: a file of yours there would make its next save fail",
                    suggestion=f"write to {where}")


def check_run_dir(out: str | Path, resuming: bool | str | Path, option: str = "--out") -> Path:
    """``out`` (``~`` expanded) for a training run: not a file, not a checkpoint directory (or inside
    one), and not another run's directory unless resuming that run (``resuming``: the ``--resume``
    path, or ``True``/``False``)."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"{option} {out} is a file; zoo train writes a run directory there",
                        suggestion="choose a directory path")
    check_parents(out, option)
    found = enclosing_checkpoint(out)
    if found is not None:
        if found == out:
            hint = (f"give its run directory {_named(out.parent)}" if holds_a_run(out.parent)
                    else "choose a directory outside it")
            raise UserError(f"{option} {out} is a checkpoint, not a run directory", suggestion=hint)
        raise UserError(f"{option} {out} is inside the checkpoint directory {_named(found)}, not a run directory",
                        suggestion="choose a directory outside it")
    found = holds_a_run(out)
    if not found and (mine := files_not_from_zoo_train(out)):
        what = mine[0] if len(mine) == 1 else f"{len(mine)} files ({some_of(mine)})"
        them = "it" if len(mine) == 1 else "them"  # every one: moving them away is one step, not one per start
        raise UserError(f"{option} {out} holds {what} that zoo train did not write; the run would replace {them}",
                        suggestion=f"choose another {option}, or move {mine[0] if len(mine) == 1 else them} away")
    if found:  # a live run there is the thing to say first: its pid, not "--resume it"
        from zoo.training.runlock import check_unlocked

        check_unlocked(out)
    if found and not resuming:
        raise UserError(f"{option} {out} already holds a run ({found}); a new run there would replace its "
                        "checkpoints and log", suggestion=f"continue it with --resume {out}, or choose another {option}")
    if found and isinstance(resuming, (str, Path)):
        source = Path(resuming).expanduser()
        checkpoint = source.is_dir() and (holds_a_run(source) or enclosing_checkpoint(source) == source)
        if checkpoint and run_of(source) != out.resolve():  # not a checkpoint: the resume's own error names it
            raise UserError(f"{option} {out} already holds a run ({found}), and --resume {resuming} is another "
                            f"run's checkpoint: continuing it there would replace {out}'s checkpoints and log",
                            suggestion=f"continue {resuming} into a new {option}, or resume {out} itself")
    return out


def looks_like_a_path(text: str) -> bool:
    """Whether a command-line word names a file or directory rather than a shipped recipe."""
    return ("/" in text or "\\" in text or text.startswith((".", "~"))
            or Path(text).suffix.lower() in RECIPE_SUFFIXES + NOT_A_SOURCE_SUFFIXES)


def resolve_sample_source(source: str) -> str:
    """A checkpoint directory (repaired if a save was interrupted) or a recipe, checked to exist.

    A run directory of ``zoo train`` stands for its newest checkpoint, ``RUN/last``, as in ``zoo eval``.
    A bare name (``dit_s_2``) may still name a shipped recipe; anything that looks like a path
    must exist, so a mistyped checkpoint path never samples a same-named recipe's random weights.
    """
    from zoo.checkpoint import CONFIG, checkpoint_of

    path = checkpoint_of(Path(source).expanduser())  # repaired; a run directory: its last/
    if path.is_dir():
        return str(path)
    if path.is_file():
        if path.suffix.lower() not in RECIPE_SUFFIXES:
            weights = path.suffix.lower() in WEIGHTS_SUFFIXES
            hint = (f"give the checkpoint directory {path.parent}" if (path.parent / CONFIG).is_file()
                    else "convert official weights with zoo convert first" if weights else None)
            raise UserError(f"{path} is neither a checkpoint directory (config.json + weights) nor a recipe .yaml",
                            suggestion=hint)
        return str(path)
    if looks_like_a_path(source):
        if not path.is_absolute():
            from zoo.recipe import find_recipe

            try:  # recipes/emoji32/dimr_2r.yaml or emoji32/dimr_2r from anywhere, as zoo build and train find it
                return str(find_recipe(source))
            except UserError:  # only a shipped recipe's whole relative name matches: never runs/x/dit_s_2
                pass
        raise UserError(f"{source} does not exist (no checkpoint directory or recipe file there)")
    return source  # a bare name: the shipped recipe of that name, if there is one
