"""Checkpoint directories: ``config.json`` + ``model.safetensors`` [+ ``ema.safetensors``] [+ ``trainer_state.pt``].

``config.json`` holds the resolved recipe and the versions that wrote it; weights are
safetensors (no pickle); trainer state is plain dicts/lists/tensors/numbers that load with
``torch.load(weights_only=True)``. A directory is written by the crash-safe protocol of
:mod:`zoo.atomic` (``config.json`` is written last and lists every file with its size), so a
reader never sees half a checkpoint and an interrupted save is repaired when the checkpoint is
next read or written. Loading is strict: any missing, unexpected or mis-shaped key is an error
that lists them; a missing, truncated or corrupt file is an error that names it.
"""

from __future__ import annotations

import json
import pickle
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

import zoo
from zoo import atomic
from zoo.domains import is_int
from zoo.errors import UserError
from zoo.jsonfile import read_json_object
from zoo.weights import build_with_state, check_finite, load_weights, save_weights

if TYPE_CHECKING:
    from zoo.recipe import Recipe

CONFIG, MODEL, EMA, TRAINER_STATE = "config.json", "model.safetensors", "ema.safetensors", "trainer_state.pt"
FORMAT = "zoo-checkpoint/1"
_PLAIN = (Tensor, int, float, bool, str, bytes, type(None), torch.dtype, torch.device, torch.Size)


def versions() -> dict[str, str]:
    """Versions of the packages that define what a checkpoint means."""
    return {"zoo": zoo.__version__, "torch": torch.__version__, "python": sys.version.split()[0]}


# ----------------------------------------------------------------------------- trainer state


def check_plain(obj: Any, where: str = "state") -> None:
    """Raise ``TypeError`` naming the first value ``torch.load(weights_only=True)`` would refuse."""
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where} has a key of type {type(k).__name__}; use str or int keys")
            check_plain(v, f"{where}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            check_plain(v, f"{where}[{i}]")
    elif not isinstance(obj, _PLAIN):
        kind = type(obj).__name__
        raise TypeError(f"{where} is a {kind}; trainer state must be plain dicts, lists, tensors, numbers")


# ----------------------------------------------------------------------------- directories

KNOWN_FILES = (CONFIG, MODEL, EMA, TRAINER_STATE)
SHARD_FILE = re.compile(r"^(?:\.metadata|__\d+_\d+\.distcp)$")  # an FSDP run's shards (torch.distributed.checkpoint)


def _known(name: str) -> bool:
    return name in KNOWN_FILES or SHARD_FILE.match(name) is not None


def is_checkpoint(directory: str | Path) -> bool:
    """Whether ``directory`` is a zoo checkpoint holding nothing but the files zoo writes there."""
    directory = Path(directory)
    payload = atomic.read_record(directory, CONFIG) if directory.is_dir() else None
    if not payload or payload.get("format") != FORMAT:
        return False
    return all(_known(p.name) for p in directory.iterdir())


def foreign_files(directory: str | Path) -> list[str]:
    """The names in ``directory`` that zoo does not write into a checkpoint (a user's files), sorted."""
    return sorted(p.name for p in Path(directory).iterdir() if not _known(p.name))


def check_replaceable(target: str | Path, what: str = "checkpoint directory") -> None:
    """Refuse to replace anything but a zoo checkpoint (or an empty directory) at ``target``."""
    target = Path(target)
    if not target.exists() and not target.is_symlink():
        return
    if not target.is_dir() or target.is_symlink():
        raise UserError(f"{what} {target} exists and is not a directory; zoo replaces only its own checkpoints",
                        suggestion="choose another path")
    if is_checkpoint(target) or not any(target.iterdir()):
        return
    if (atomic.read_record(target, CONFIG) or {}).get("format") == FORMAT:
        foreign = foreign_files(target)
        raise UserError(f"{what} {target} also holds files zoo did not write ({', '.join(foreign[:5])}); "
                        "zoo will not replace it", suggestion="move them away or choose another path")
    raise UserError(f"{what} {target} exists and is not a zoo checkpoint; zoo will not replace it",
                    suggestion="choose another path")


def repair_checkpoint(directory: str | Path, in_place: bool = False) -> Path | None:
    """Finish or undo an interrupted save of ``directory`` (see :mod:`zoo.atomic`); ``directory`` if it exists.
    ``in_place``: where that is refused (a read-only copy), the save that would replace it, left where it is."""
    return atomic.repair(directory, CONFIG, in_place=in_place)


def checkpoint_of(path: str | Path) -> Path:
    """``path``, or for a ``zoo train`` run directory its newest checkpoint: ``path/last``, or the
    ``step_*/`` a kill between a step's two saves left newer than it (the one ``--resume`` continues);
    repaired first if a crash interrupted their save (on a read-only copy, the newer save is read where it is)."""
    path = Path(path)
    # a save interrupted between its two renames: `last` comes back
    last = repair_checkpoint(path / "last", in_place=True) or path / "last"
    here = repair_checkpoint(path, in_place=True) or path
    if not (last / CONFIG).is_file():
        return here
    return (step_saved_after_last(path) if last == path / "last" else None) or last


def step_saved_after_last(run: Path) -> Path | None:
    """The run's newest ``step_*/`` where it was sealed after ``last/`` (``last/`` is written after the
    step's directory: a kill between the two), else ``None``."""
    last, newest = run / "last", newest_step(run)
    if newest is None or not atomic.is_sealed(last, CONFIG):
        return None
    return newest if atomic.sealed_at(newest, CONFIG) > atomic.sealed_at(last, CONFIG) else None


# Steps are written with at least 7 digits (step_0000500): step 10,000,000 on takes 8 (train.steps may be 1e9)
RUN_NAMES = re.compile(r"last|step_\d{7,}|log\.jsonl|loss\.png")  # what zoo train writes in a run directory
STEP_NAME = re.compile(r"step_\d{7,}")
GRID_NAMES = re.compile(r"step_\d{7,}\.png")  # and in its samples/


def repair_run(directory: str | Path, files: bool = True) -> list[Path]:
    """Repair every interrupted checkpoint save in a run directory and delete its temporary files
    (only of the names zoo train writes there: a directory that is not a run keeps its files).
    ``files=False``: the checkpoints only, for a reader that does not own the run (its temporary
    files may be a live run's half-written loss.png)."""
    directory = Path(directory)
    repaired = atomic.repair_all(directory, CONFIG, ours=RUN_NAMES.fullmatch, files=files)
    if files and (directory / "samples").is_dir():
        atomic.repair_all(directory / "samples", CONFIG, ours=GRID_NAMES.fullmatch)
    return repaired


class _WholeWrites:
    """A file for ``torch.save`` whose ``write`` writes every byte or raises, and keeps what it raised:
    torch reports a failed write (a full disk) as 'unexpected pos', a RuntimeError that does not
    say why, and turns a Ctrl-C or SIGTERM that lands in a write into the same RuntimeError;
    :func:`_torch_save` raises the ``OSError`` or the interrupt instead."""

    def __init__(self, raw) -> None:
        self.raw, self.error = raw, None

    def write(self, data) -> int:
        try:
            return atomic.write_all(self.raw, data)
        except (OSError, KeyboardInterrupt, SystemExit) as err:  # Terminated and StopRequested are interrupts too
            self.error = self.error or err
            raise

    def flush(self) -> None:
        pass


def _torch_save(obj: Any, path: Path) -> None:
    """``torch.save(obj, path)``, with a failed write (a full disk) raised as its ``OSError``, and an interrupt
    during a write as itself (a second Ctrl-C mid-save then stops at once, exit 130, not with a traceback)."""
    with open(path, "wb", buffering=0) as f:
        writer = _WholeWrites(f)
        try:
            torch.save(obj, writer)
        except Exception:
            if writer.error is not None:
                raise writer.error from None
            raise


def save_checkpoint(
    directory: str | Path,
    model: nn.Module | Mapping[str, Tensor],
    config: Mapping[str, Any],
    ema: nn.Module | Mapping[str, Tensor] | None = None,
    state: Mapping[str, Any] | None = None,
    also: Callable[[Path], None] | None = None,
    classes: Sequence[str] = (),
) -> Path:
    """Write a checkpoint directory crash-safely (replacing an existing checkpoint) and return its path.

    ``model`` is a model or its state dict, ``config`` the resolved recipe (JSON-serialisable),
    ``ema`` an EMA model or its state dict, ``state`` the trainer state (step, optimizer, RNG...)
    as plain data; ``also(tmp)`` writes more files (an FSDP run's shards) before these; ``classes``
    the names of the labels the model was trained with, in label order (see :func:`read_classes`). An existing
    ``directory`` that is not a zoo checkpoint is never replaced (:class:`UserError`).
    """
    if state is not None:
        check_plain(state, "trainer state")

    def fill(tmp: Path) -> None:
        if also is not None:
            also(tmp)
        save_weights(tmp / MODEL, model.state_dict() if isinstance(model, nn.Module) else model)
        if ema is not None:
            save_weights(tmp / EMA, ema.state_dict() if isinstance(ema, nn.Module) else ema)
        if state is not None:
            _torch_save(dict(state), tmp / TRAINER_STATE)

    from zoo.registry import plugins_named

    payload = {"format": FORMAT, "versions": versions(), "recipe": dict(config)}
    plugins = plugins_named(payload["recipe"])
    if plugins:  # what loading it needs besides zoo, said when a name of theirs is unknown
        payload["plugins"] = plugins
    if classes:
        payload["classes"] = [str(name) for name in classes]
    json.dumps(payload)  # a recipe that is not JSON fails here, before anything is written
    return atomic.write_dir(directory, fill, CONFIG, payload, replace=check_replaceable)


def _checkpoint_dir(directory: str | Path) -> Path:
    """``directory`` after repairing an interrupted save of it, checked to exist and be complete."""
    directory = Path(directory)
    repair_checkpoint(directory)
    if not directory.exists():
        raise UserError(f"checkpoint directory {directory} does not exist")
    if not directory.is_dir():
        raise UserError(f"{directory} is a file, not a checkpoint directory ({CONFIG} + {MODEL})")
    problems = atomic.missing_or_truncated(directory, CONFIG)
    if problems and not directory.exists():  # its record was read, then it went: not a broken save
        raise deleted_while_read(directory)
    if problems:
        newest = newest_step(directory.parent) if directory.name == "last" else None
        raise UserError(f"checkpoint {directory} is incomplete: {'; '.join(problems)}",
                        suggestion=f"{newest} is the run's newest complete checkpoint" if newest else None)
    return directory


def require_ema(directory: str | Path) -> None:
    """``--weights ema``: a complete checkpoint (else the message says what is missing) that holds EMA weights;
    asked for by name, the raw weights never go in their place."""
    directory = _checkpoint_dir(directory)
    if not (directory / EMA).is_file():
        raise UserError(f"--weights ema: {directory} has no EMA weights ({EMA})",
                        suggestion="drop --weights (the raw weights of a checkpoint without EMA), or --weights raw")


def trained_step(directory: str | Path) -> int | None:
    """The step a ``zoo train`` checkpoint was saved at, from its trainer state memory-mapped (the optimizer
    moments, gigabytes for an XL model, are not read); ``None`` where it has none (a converted or exported
    checkpoint) or it cannot be read."""
    import warnings

    path = Path(directory) / TRAINER_STATE
    if not path.is_file():
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError):  # damaged: the caller goes without
        return None
    step = state.get("step") if isinstance(state, dict) else None
    return step if is_int(step) and step >= 0 else None


def saved_files_identity(directory: Path) -> tuple:
    """Device, inode, size and mtime of a checkpoint's files: a save that replaces the directory (or any
    of them) changes it, so equal values before and after a read mean the read saw one save."""
    def identity(path: Path) -> tuple[int, int, int, int] | None:
        try:
            st = path.stat()
        except OSError:  # missing, a file given as the checkpoint, a link loop: refused where read
            return None
        return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns

    return tuple(identity(directory / name) for name in (CONFIG, MODEL, EMA, TRAINER_STATE))


def deleted_while_read(directory: Path) -> UserError:
    """The error for a checkpoint that went while it was read (a running zoo train pruning it)."""
    return UserError(f"checkpoint {directory} was deleted while it was being read",
                     suggestion="a running zoo train deletes its older step_* checkpoints (train.keep_last): "
                     "read last/ or a newer step_*")


def read_whole(directory: str | Path, read: Callable[[], Any], tries: int = 3, pause_s: float = 0.05,
               was_read: bool = False) -> Any:
    """``read()`` of checkpoint ``directory``'s files, all of one save. A running zoo train replaces its
    ``last/`` with each save and deletes older ``step_*`` (``train.keep_last``): a read that a save overlapped
    is done again (a weights file of one save beside the trainer state of the next resumed silently); one
    of a checkpoint that went meanwhile says it was deleted (it did not fall back to anything else).
    ``was_read``: the caller read the checkpoint already (its recipe), so one gone now went meanwhile."""
    import time

    directory = Path(directory)
    existed = was_read or directory.is_dir()  # (one that never existed keeps read()'s own error)
    for attempt in range(tries):
        before = saved_files_identity(directory)
        try:
            value = read()
        except UserError:
            if existed and not directory.is_dir():  # gone, or between the two renames of a save replacing it
                if attempt + 1 < tries:
                    time.sleep(pause_s)
                    continue
                raise deleted_while_read(directory) from None
            if saved_files_identity(directory) != before:  # replaced while read: what failed was half of two saves
                continue
            raise
        if saved_files_identity(directory) == before:
            return value
    raise UserError(f"checkpoint {directory} was replaced by a newer save each of {tries} times it was read "
                    "(a running zoo train saving there)",
                    suggestion="read one of the run's step_* checkpoints, or wait for the run to end")


def run_of(checkpoint: Path) -> Path | None:
    """The ``zoo train`` run directory a checkpoint lies in (its parent holds ``last/`` or ``log.jsonl``), else None."""
    parent = Path(checkpoint).parent
    return parent if (parent / "last").is_dir() or (parent / "log.jsonl").is_file() else None


def newest_step(run: Path) -> Path | None:
    """The ``step_*`` checkpoint of ``run`` sealed last among the complete ones (``None``: there is none)."""
    steps = [d for d in run.glob("step_*") if STEP_NAME.fullmatch(d.name) and atomic.is_sealed(d, CONFIG)]
    return max(steps, key=lambda d: atomic.sealed_at(d, CONFIG), default=None)


def newest_step_hint(run: Path) -> str | None:
    """What to pass instead of a run directory without its ``last/``: its newest step checkpoint."""
    newest = newest_step(run)
    return f"its newest checkpoint is {newest}: pass that" if newest else None


def resume_point(run: Path) -> tuple[Path, str | None]:
    """The checkpoint a resume of run directory ``run`` continues from, and a note when it is not ``last/``.

    ``last/`` is saved after the step's ``step_*/``: a kill between the two left a ``step_*/`` newer than
    ``last/``, which is taken instead; so is the newest complete ``step_*/`` where ``last/`` is
    incomplete (a file truncated or missing), which otherwise stopped every restart of the job.
    """
    last, newest = run / "last", newest_step(run)
    if newest is None:
        return last, None
    if atomic.is_sealed(last, CONFIG):
        after = step_saved_after_last(run)
        if after is not None:
            return after, (f"{after.name} was saved after last/ (the run was stopped between the two saves): "
                           f"resuming from {after}")
        return last, None
    problems = atomic.missing_or_truncated(last, CONFIG)
    if not (last / CONFIG).exists() and any((last / name).is_file() for name in (MODEL, EMA, TRAINER_STATE)):
        # No save leaves this (config.json seals a renamed directory): a hand deleted it; the save after
        # a resume would have to replace last/, which without its config.json zoo cannot tell from a user's
        raise UserError(f"{last} has no {CONFIG}, so it is no complete checkpoint ({newest} is the run's newest "
                        "complete checkpoint)", suggestion=f"move {last} away and resume with --resume {newest}")
    if problems:
        return newest, (f"{last} is incomplete ({'; '.join(problems)}): resuming from {newest}, the newest "
                        "complete checkpoint")
    return last, None  # not a checkpoint at all: reading it says so


def resumed_checkpoint(directory: Path) -> tuple[Path, str | None]:
    """The checkpoint ``zoo train --resume directory`` reads, and a note where it is not the one named: a run
    directory's :func:`resume_point`, a run without ``last/`` its newest complete ``step_*/``, else itself."""
    if (directory / "last").is_dir():
        return resume_point(directory)
    if not (directory / CONFIG).is_file():
        newest = newest_step(directory)  # by when it was sealed: a higher step may be a branch left behind
        if newest is not None:  # a run whose last/ was deleted: its step directories are checkpoints too
            return newest, f"{directory} has no last/: resuming from {newest}, its newest complete checkpoint"
    return directory, None


def read_config(directory: str | Path) -> dict:
    """The recipe stored in a checkpoint directory (after repairing an interrupted save of it), without
    the :data:`RETIRED_KEYS` (a resume does not call them a change of the recipe)."""
    return checkpoint_recipe(directory).data


def read_classes(directory: str | Path) -> list[str]:
    """The class names a checkpoint's model was trained with, label 0 first (``[]`` when not recorded).

    An image folder's labels are its sorted subfolders at the time of training: a class folder
    added since then would shift every later label, so sampling by name and resuming read these.
    """
    classes = _read_payload(directory).get("classes")
    return [str(name) for name in classes] if isinstance(classes, list) else []


def _read_payload(directory: str | Path) -> dict:
    directory = _checkpoint_dir(directory)
    path = directory / CONFIG
    if not path.is_file():
        from zoo.guards import WEIGHTS_SUFFIXES
        from zoo.recipe import shadowed_recipe_hint

        official = directory.is_dir() and any(f.suffix in WEIGHTS_SUFFIXES
                                              for f in directory.iterdir())  # U-ViT's 300000.ckpt/ of nnet*.pth
        raise UserError(f"{directory} is not a zoo checkpoint (no {CONFIG})", suggestion=newest_step_hint(directory)
                        or ("it holds weights files: convert official weights with zoo convert first" if official
                            else shadowed_recipe_hint(directory)))
    payload = read_json_object(path, "checkpoint config")
    if payload.get("format") != FORMAT or not isinstance(payload.get("recipe"), dict):
        raise UserError(f"{path} is not a {FORMAT} config (a JSON object with format and recipe)")
    return payload


#: Keys earlier zoo versions accepted and nothing read: a checkpoint's recipe may still hold them.
RETIRED_KEYS = {("data", "name"): "read by nothing, no longer a recipe key"}
_RETIRED_NOTED: set[str] = set()


def _without_retired_keys(recipe: Any, source: str) -> Any:
    """``recipe`` without the :data:`RETIRED_KEYS` (a copy; one note per checkpoint): they changed nothing
    when it was trained, so the run stays readable; new recipes are refused them as unknown keys."""
    if not isinstance(recipe, dict):
        return recipe
    found = [(section, key) for section, key in RETIRED_KEYS
             if isinstance(recipe.get(section), dict) and key in recipe[section]]
    if not found:
        return recipe
    recipe = {**recipe, **{section: dict(recipe[section]) for section, _ in found}}
    for section, key in found:
        del recipe[section][key]
    if source not in _RETIRED_NOTED:
        _RETIRED_NOTED.add(source)
        print(f"zoo: note: {source}: " + "; ".join(f"{s}.{k} ignored ({RETIRED_KEYS[s, k]})" for s, k in found),
              file=sys.stderr)
    return recipe


def checkpoint_recipe(directory: str | Path, payload: dict | None = None) -> Recipe:
    """A checkpoint's recipe as written (retired keys dropped), named by its ``config.json``; not validated."""
    from zoo.recipe import Recipe

    payload = _read_payload(directory) if payload is None else payload
    source = str(Path(directory) / CONFIG)
    return Recipe(_without_retired_keys(payload["recipe"], source), source=source)


def load_recipe_of(directory: str | Path, overrides: list[str] = ()) -> dict:
    """A checkpoint's recipe, validated; a mistake in it names its ``config.json``, and a component
    name that is unknown here names the plugin distributions the checkpoint was written with."""
    import zoo

    payload = _read_payload(directory)
    source = str(Path(directory) / CONFIG)
    try:
        recipe = zoo.load_recipe(checkpoint_recipe(directory, payload), overrides)
        if not isinstance(recipe.get("model"), dict):  # a recipe file may lack it, a checkpoint's cannot
            raise UserError(f"{source}: its recipe has no model section, so the weights cannot be built",
                            suggestion="restore the model section the checkpoint was written with")
        return recipe
    except UserError as err:
        add_plugin_hint(err, payload.get("plugins"))
        raise


def add_plugin_hint(err: UserError, plugins: object) -> None:
    """Say in ``err``'s hint which recorded plugin (``{dist: version}``) a saved model was written with, when
    that explains ``err``: one not installed here for an unknown name, one installed at another version
    for any failure."""
    missing, changed = _plugin_differences(plugins)
    hints = []
    # an unknown registry name: "unknown block 'x'", or a recipe key's "dataset must be one of ..., got 'x'"
    if missing and (err.message.startswith("unknown ") or " must be one of " in err.message):
        hints.append("it was written with the plugin " + ", ".join(missing) + " installed: pip install "
                     + " ".join(missing))
    if changed:
        hints.append("it was written with " + ", ".join(f"{pin} and {now} is installed" for pin, now in changed)
                     + ": pip install " + " ".join(pin for pin, _ in changed))
    if hints:
        keep = [err.suggestion] if err.suggestion and not err.message.startswith("unknown ") else []
        err.suggestion = "; ".join(keep + hints)


def _plugin_differences(plugins: object) -> tuple[list[str], list[tuple[str, str]]]:
    """The recorded plugins not installed here (``"dist==version"``), and those installed at another
    version (``("dist==version", installed)``)."""
    from zoo.registry import distribution_version

    missing, changed = [], []
    for name, version in plugins.items() if isinstance(plugins, dict) else ():
        pinned = version not in (None, "unknown")
        pin = f"{name}=={version}" if pinned else str(name)
        installed = distribution_version(str(name))
        if installed is None:
            missing.append(pin)
        elif pinned and installed != str(version):
            changed.append((pin, installed))
    return missing, changed


def load_checkpoint(
    directory: str | Path, weights: str = "model", device: str | torch.device = "cpu",
    recipe: Mapping[str, Any] | None = None,
) -> tuple[nn.Module, dict]:
    """Build the checkpoint's model from its recipe and load its weights strictly.

    ``weights="ema"`` loads ``ema.safetensors``; an EMA file holding only parameters takes its
    buffers from ``model.safetensors``. ``recipe``: the checkpoint's recipe as the caller already
    resolved it (its ``model`` section the checkpoint's; other sections may differ, e.g. a sampler
    replacing a recorded plugin solver that is not installed here).
    """
    import zoo

    if weights not in ("model", "ema"):
        raise UserError(f"weights must be 'model' or 'ema', not {weights!r}")
    directory = Path(directory)
    config = dict(recipe) if recipe is not None else load_recipe_of(directory)
    with torch.device("meta"):
        skeleton = zoo.build_model(config)
    expected, params = skeleton.state_dict(), {k for k, _ in skeleton.named_parameters()}
    state, source = checkpoint_weights(directory, weights, params)
    model = build_with_state(lambda: zoo.build_model(config), state, str(source),
                             suggestion=_construction_change(state, expected) or
                             f"the model section of {directory / CONFIG} does not describe these weights: "
                             "it was edited after the save (restore the recipe they were trained with), or an "
                             "earlier zoo that built this model otherwise wrote them (load them with that version)")
    return model.to(device), config


def _construction_change(state: Mapping[str, Tensor], expected: Mapping[str, Tensor]) -> str | None:
    """What changed in how zoo builds a model, where ``state`` fits the earlier construction exactly."""
    unexpected = set(state) - set(expected)
    shared_gate = [k for k in unexpected if k.endswith((".bias.w", ".bias.b"))
                   and k.rsplit(".", 1)[0] + ".p0" in expected and k.rsplit(".", 2)[0] + ".weight.w" in expected]
    if shared_gate and len(shared_gate) == len(unexpected):
        return ("td_layernorm_paper shares one gate between its scale and shift since zoo of 2026-12-07 (eq. 5-7); "
                "these weights have the earlier separate gate of the shift: load them with a zoo from before then")
    wider = [k for k, v in state.items() if k.endswith("fc1.weight") and k in expected
             and v.shape[1:] == expected[k].shape[1:] and v.shape[0] == expected[k].shape[0] + 1]
    if wider:
        return ("the MLP width is int(width x mlp_ratio) since zoo of 2026-12-06, as the official constructors "
                "build it (it was rounded to the nearest before): these weights have the rounded width; load "
                "them with a zoo from before then")
    return None


def checkpoint_weights(directory: Path, weights: str, params: set[str]) -> tuple[dict[str, Tensor], Path]:
    """A checkpoint's ``model`` or ``ema`` state dict and the file it came from, checked to be finite. An
    EMA file holding exactly the parameters ``params`` takes the model's buffers from ``model.safetensors``."""
    state = load_weights(directory / MODEL)
    if weights == "model":
        check_finite(state, str(directory / MODEL))
        return state, directory / MODEL
    ema = load_weights(directory / EMA)
    check_finite(ema, str(directory / EMA))
    return ({**state, **ema} if set(ema) == params else ema), directory / EMA  # parameters only: buffers from the model


def load_trainer_state(directory: str | Path, map_location: str | torch.device = "cpu",
                       required: tuple[str, ...] = ("step",)) -> dict:
    """The trainer state of a checkpoint (``weights_only=True``): a dict with a ``step`` and the ``required`` keys."""
    from zoo.torchfile import torch_load_plain

    directory = _checkpoint_dir(directory)
    path = directory / TRAINER_STATE
    if not path.is_file():
        raise UserError(f"{directory} has no trainer state ({TRAINER_STATE}); it cannot be resumed",
                        suggestion="resume from a checkpoint zoo train wrote (RUN, RUN/last or RUN/step_*); "
                        "converted or exported weights hold no optimizer state to continue")
    state = torch_load_plain(path, "trainer state", map_location=map_location)
    if not isinstance(state, dict):
        raise UserError(f"trainer state {path} holds a {type(state).__name__}, not a dict")
    missing = [k for k in dict.fromkeys(("step", *required)) if k not in state]
    if missing or not isinstance(state["step"], int) or state["step"] < 0:
        what = f"no {', '.join(missing)}" if missing else f"step {state['step']!r} is not a step number"
        raise UserError(f"trainer state {path} is not one zoo train wrote: {what}")
    return state
