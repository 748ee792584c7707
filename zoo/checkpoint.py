"""Checkpoint directories: ``config.json`` + ``model.safetensors`` [+ ``ema.safetensors``] [+ ``trainer_state.pt``].

``config.json`` holds the resolved recipe and the versions that wrote it; weights are
safetensors (no pickle); trainer state is plain dicts/lists/tensors/numbers that load with
``torch.load(weights_only=True)``. A directory is written under a temporary name and renamed
into place, so a reader never sees half a checkpoint. Loading is strict: any missing,
unexpected or mis-shaped key is an error that lists them.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import uuid
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from zoo.errors import UserError

CONFIG, MODEL, EMA, TRAINER_STATE = "config.json", "model.safetensors", "ema.safetensors", "trainer_state.pt"
FORMAT = "zoo-checkpoint/1"
_PLAIN = (Tensor, int, float, bool, str, bytes, type(None), torch.dtype, torch.device, torch.Size)


def versions() -> dict[str, str]:
    """Versions of the packages that define what a checkpoint means."""
    try:
        zoo_version = metadata.version("zoo-diffusion")
    except metadata.PackageNotFoundError:
        zoo_version = "unknown"
    return {"zoo": zoo_version, "torch": torch.__version__, "python": sys.version.split()[0]}


# ----------------------------------------------------------------------------- weights


def _storage_key(t: Tensor) -> tuple:
    return (t.device, t.untyped_storage().data_ptr())


def _tensors_for_safetensors(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Drop exact aliases (tied weights) and copy anything safetensors refuses (shared storage, non-contiguous).

    Returns the tensors to write and ``{alias: kept_name}`` for restoring the aliases.
    """
    kept: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    storages: set[tuple] = set()
    for name in sorted(state):
        t = state[name].detach()
        view = (*_storage_key(t), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if view in seen:
            aliases[name] = seen[view]
            continue
        seen[view] = name
        if not t.is_contiguous() or _storage_key(t) in storages:
            t = t.clone(memory_format=torch.contiguous_format)
        storages.add(_storage_key(t))
        kept[name] = t.cpu()
    return kept, aliases


def save_weights(path: str | Path, state: Mapping[str, Tensor]) -> None:
    """Write a state dict as safetensors, handling tied and non-contiguous tensors."""
    tensors, aliases = _tensors_for_safetensors(state)
    save_file(tensors, str(path), metadata={"format": "pt", "aliases": json.dumps(aliases)})


def load_weights(path: str | Path) -> dict[str, Tensor]:
    """Read a safetensors state dict written by :func:`save_weights` (aliases restored)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file {path} does not exist")
    state = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    for alias, name in aliases.items():
        state[alias] = state[name]
    return state


def _check_keys(expected: Mapping[str, Tensor], state_dict: Mapping[str, Tensor], source: str) -> None:
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k} {tuple(state_dict[k].shape)} (model: {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or mismatched:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)):
            if items:
                more = f", ... ({len(items)} in all)" if len(items) > 10 else ""
                parts.append(f"{label} keys: {', '.join(items[:10])}{more}")
        raise UserError(f"{source} does not match the model; " + "; ".join(parts))


def load_state_dict_strict(model: nn.Module, state_dict: Mapping[str, Tensor], source: str = "state dict") -> None:
    """``model.load_state_dict(strict=True)`` with an error that lists missing, unexpected and mis-shaped keys."""
    _check_keys(model.state_dict(), state_dict, source)
    model.load_state_dict(state_dict, strict=True)


def build_with_state(
    build: Callable[[], nn.Module], state: Mapping[str, Tensor], source: str = "state dict"
) -> nn.Module:
    """``build()`` a model and load ``state`` into it strictly, without initialising weights twice.

    The model is built on the ``meta`` device and the loaded tensors are assigned to it (cast
    to each parameter's dtype), so loading a large checkpoint costs no random init and no
    second copy. Models with non-persistent buffers (not in any state dict) are built normally.
    """
    with torch.device("meta"):
        model = build()
    persistent = set(model.state_dict())
    if any(name not in persistent for name, _ in model.named_buffers()):
        model = build()
        load_state_dict_strict(model, state, source)
        return model
    expected = model.state_dict()
    _check_keys(expected, state, source)
    cast = {k: v.to(expected[k].dtype) for k, v in state.items()}
    model.load_state_dict(cast, strict=True, assign=True)
    return model


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


def _fsync_dir(path: Path) -> None:
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


def save_checkpoint(
    directory: str | Path,
    model: nn.Module,
    config: Mapping[str, Any],
    ema: nn.Module | Mapping[str, Tensor] | None = None,
    state: Mapping[str, Any] | None = None,
) -> Path:
    """Write a checkpoint directory atomically (replacing an existing one) and return its path.

    ``config`` is the resolved recipe (JSON-serialisable); ``ema`` an EMA model or its state
    dict; ``state`` the trainer state (step, optimizer, RNG...) as plain data.
    """
    directory = Path(directory)
    if state is not None:
        check_plain(state, "trainer state")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(f"{directory.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        payload = {"format": FORMAT, "versions": versions(), "recipe": dict(config)}
        (tmp / CONFIG).write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
        save_weights(tmp / MODEL, model.state_dict())
        if ema is not None:
            save_weights(tmp / EMA, ema.state_dict() if isinstance(ema, nn.Module) else ema)
        if state is not None:
            torch.save(dict(state), tmp / TRAINER_STATE)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(tmp)
        old = None
        if directory.exists():
            old = directory.with_name(f"{directory.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(directory, old)
        os.replace(tmp, directory)
        _fsync_dir(directory.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def read_config(directory: str | Path) -> dict:
    """The recipe stored in a checkpoint directory."""
    path = Path(directory) / CONFIG
    if not path.is_file():
        raise UserError(f"{directory} is not a zoo checkpoint (no {CONFIG})")
    try:
        payload = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or "recipe" not in payload:
        raise UserError(f"{path} is not a {FORMAT} config")
    return payload["recipe"]


def load_checkpoint(
    directory: str | Path, weights: str = "model", device: str | torch.device = "cpu"
) -> tuple[nn.Module, dict]:
    """Build the checkpoint's model from its recipe and load its weights strictly.

    ``weights="ema"`` loads ``ema.safetensors``; an EMA file holding only parameters takes its
    buffers from ``model.safetensors``.
    """
    import zoo

    directory = Path(directory)
    config = read_config(directory)
    state = load_weights(directory / MODEL)
    if weights == "ema":
        ema = load_weights(directory / EMA)
        with torch.device("meta"):
            params = {k for k, _ in zoo.build_model(config).named_parameters()}
        state = {**state, **ema} if set(ema) == params else ema  # parameters only: buffers from the model
    elif weights != "model":
        raise UserError(f"weights must be 'model' or 'ema', not {weights!r}")
    source = str(directory / (EMA if weights == "ema" else MODEL))
    model = build_with_state(lambda: zoo.build_model(config), state, source)
    return model.to(device), config


def load_trainer_state(directory: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """The trainer state of a checkpoint (``weights_only=True``)."""
    path = Path(directory) / TRAINER_STATE
    if not path.is_file():
        raise UserError(f"{directory} has no trainer state ({TRAINER_STATE}); it cannot be resumed")
    return torch.load(path, map_location=map_location, weights_only=True)
