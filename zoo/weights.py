"""Model weights as safetensors files, and strict loading of a state dict into a model.

Files hold no pickle; tied and non-contiguous tensors are written once and restored on reading;
the same state always gives the same bytes (``zoo eval`` keys its samples by the file's sha256).
Loading is strict: a missing, unexpected or mis-shaped key is an error listing them, and weights
holding NaN or inf are refused before they are used.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from zoo.errors import UserError


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
    """Write a state dict as safetensors, handling tied and non-contiguous tensors.

    The same state gives the same bytes (so the same sha256, which ``zoo eval`` keys its samples by).
    """
    tensors, aliases = _tensors_for_safetensors(state)
    save_reproducibly(path, tensors, {"format": "pt", "aliases": json.dumps(aliases)})


def save_reproducibly(path: str | Path, tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> None:
    """``safetensors.torch.save_file`` whose bytes depend on the tensors and metadata only (see :func:`sort_metadata`)."""
    save_file(dict(tensors), str(path), metadata=dict(metadata))
    sort_metadata(path)


def sort_metadata(path: str | Path) -> None:
    """Rewrite a safetensors file's ``__metadata__`` with its keys sorted, in place.

    safetensors writes the metadata from a hash map whose order changes from one process to the
    next, so one state saved twice gave two files. The rewritten header has the same length (the
    same keys and values, reordered; padded with spaces as safetensors pads it), so the tensor
    data after it does not move.
    """
    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        metadata = header.get("__metadata__")
        if not isinstance(metadata, dict) or len(metadata) < 2:
            return
        header["__metadata__"] = dict(sorted(metadata.items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(text) > size:  # (not expected: the same JSON values, reordered)
            return
        f.seek(8)
        f.write(text + b" " * (size - len(text)))


def load_weights(path: str | Path) -> dict[str, Tensor]:
    """Read a safetensors state dict written by :func:`save_weights` (aliases restored).

    A missing, truncated or foreign file is a :class:`UserError` naming it.
    """
    from safetensors import SafetensorError

    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file {path} does not exist" if not path.exists() else f"weights file {path} is not a file")
    try:
        path.open("rb").close()  # safetensors says 'No such file' for a file it may not read
    except PermissionError:
        raise UserError(f"cannot read weights file {path}: permission denied",
                        suggestion="make it readable (chmod), or run as its owner") from None
    try:
        state = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"cannot read weights file {path}: not a complete safetensors file ({reason})") from None
    try:
        aliases = json.loads(metadata.get("aliases", "{}"))
        for alias, name in aliases.items():
            state[alias] = state[name]
    except (ValueError, AttributeError, KeyError, TypeError):
        raise UserError(f"weights file {path} has broken 'aliases' metadata") from None
    return state


def weights_on_meta(path: str | Path) -> dict[str, Tensor] | None:
    """The tensors of a weights file written by :func:`save_weights` as meta tensors of their shapes (aliases
    included), read from its header alone: whether they fit a model, without loading them. ``None`` where the
    file cannot be read (:func:`load_weights` says why)."""
    from safetensors import SafetensorError

    try:
        with safe_open(str(path), framework="pt") as f:
            state = {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
            aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
        return {**state, **{alias: state[name] for alias, name in aliases.items()}}
    except (SafetensorError, OSError, ValueError, AttributeError, KeyError, TypeError):
        return None


def key_mismatch(expected: Mapping[str, Tensor], state_dict: Mapping[str, Tensor],
                 rename: Callable[[str], list[str]] | None = None) -> str:
    """The missing, unexpected and mis-shaped keys of ``state_dict`` against ``expected``, as one clause
    (``""``: it fits). ``rename`` gives the names to show for a key (a converted checkpoint's official ones,
    which the user can find in the file; several zoo keys may share one); a mis-shaped key it renames shows
    both names, as its shapes are the converted ones."""
    def names(keys: list[str]) -> list[str]:
        return list(dict.fromkeys(n for k in keys for n in rename(k))) if rename else keys

    def shape_of(k: str, v: Tensor) -> str:
        shown = " / ".join(rename(k)) if rename else k
        return f"{shown}{'' if shown == k else f' → {k}'} {tuple(state_dict[k].shape)} (model: {tuple(v.shape)})"

    missing = names([k for k in expected if k not in state_dict])
    unexpected = names([k for k in state_dict if k not in expected])
    mismatched = [shape_of(k, v) for k, v in expected.items()
                  if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)]
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)):
        if items:  # the first few say what differs; hundreds of names would bury the line
            more = f", ... ({len(items)} in all)" if len(items) > 3 else ""
            parts.append(f"{label} keys: {', '.join(items[:3])}{more}")
    return "; ".join(parts)


def check_keys(expected: Mapping[str, Tensor], state_dict: Mapping[str, Tensor], source: str,
                suggestion: str | None = None, rename: Callable[[str], list[str]] | None = None) -> None:
    """Raise one line listing missing, unexpected and mis-shaped keys (:func:`key_mismatch`)."""
    mismatch = key_mismatch(expected, state_dict, rename)
    if mismatch:
        raise UserError(f"{source} does not match the model; {mismatch}", suggestion=suggestion)


def load_state_dict_strict(model: nn.Module, state_dict: Mapping[str, Tensor], source: str = "state dict",
                           suggestion: str | None = None, rename: Callable[[str], list[str]] | None = None) -> None:
    """``model.load_state_dict(strict=True)`` with an error that lists missing, unexpected and mis-shaped keys
    (named by ``rename``, see :func:`check_keys`)."""
    check_keys(model.state_dict(), state_dict, source, suggestion, rename)
    model.load_state_dict(state_dict, strict=True)


def build_with_state(
    build: Callable[[], nn.Module], state: Mapping[str, Tensor], source: str = "state dict",
    suggestion: str | None = None, rename: Callable[[str], list[str]] | None = None,
) -> nn.Module:
    """``build()`` a model and load ``state`` into it strictly, without initialising weights twice.

    The model is built on the ``meta`` device and the loaded tensors are assigned to it (cast
    to each parameter's dtype), so loading a large checkpoint costs no random init and no
    second copy. Models with non-persistent buffers (not in any state dict) are built normally.
    ``suggestion`` and ``rename`` shape a key mismatch's message (see :func:`check_keys`).
    """
    with torch.device("meta"):
        model = build()
    persistent = set(model.state_dict())
    if any(name not in persistent for name, _ in model.named_buffers()):
        model = build()
        load_state_dict_strict(model, state, source, suggestion, rename)
        return model
    expected = model.state_dict()
    check_keys(expected, state, source, suggestion, rename)
    cast = {k: v.to(expected[k].dtype) for k, v in state.items()}
    model.load_state_dict(cast, strict=True, assign=True)
    return model


def check_finite(state: Mapping[str, Tensor], source: str,
                 suggestion: str = "use a checkpoint saved before the run diverged (an earlier step_*)") -> None:
    """Refuse weights holding NaN or inf, naming the first such tensor: they sample black images, and a
    run started from them stops at step 1 blaming its learning rate. zoo never saves them (a diverged
    run stops before its save), so here they mean a file changed after it was written or a foreign one."""
    for key, value in state.items():
        if not value.is_floating_point():
            continue
        try:
            finite = bool(torch.isfinite(value).all())
        except (NotImplementedError, RuntimeError):  # float8 has no isfinite kernel
            finite = bool(torch.isfinite(value.float()).all())
        if not finite:
            raise UserError(f"{source}: tensor {key} holds NaN or inf values", suggestion=suggestion)
