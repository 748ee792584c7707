"""Reading ``.pt``/``.pth`` files safely: ``torch.load(weights_only=True)`` with errors for people.

Every torch file zoo reads goes through :func:`torch_load_plain`. PyTorch's own messages for a
file it refuses are long and advise re-running with ``weights_only=False`` (which would run
arbitrary code from the file); zoo never does that, so the errors here say in one line what
the file is instead: missing, a directory, empty, truncated, not a torch file, or a pickle
holding Python objects (named) rather than tensors and plain data.
"""

from __future__ import annotations

import pickle
import re
import struct
import warnings
from pathlib import Path
from typing import Any, Iterable

import torch

from .errors import UserError

# What the unpickler raises on bytes that are not pickle data (an opcode popping an empty stack,
# a memo key that was never stored, a bad UTF-8 string, ...): random bytes hit all of these.
_GARBAGE_PICKLE = (pickle.UnpicklingError, UnicodeDecodeError, ValueError, IndexError, KeyError, TypeError,
                   struct.error)  # fmt: skip
_GLOBAL = re.compile(r"[Uu]nsupported (?:global: )?GLOBAL ([\w.]+)")  # both of torch's wordings


# How every torch file starts: a zip archive (torch >= 1.6), or the legacy format's pickled magic
# number (0x1950a86a20f9469cfc6c) after the pickle's PROTO opcode (and a FRAME for protocols 4-5).
_ZIP_HEAD, _LEGACY_MAGIC = b"PK\x03\x04", b"\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19"


def _legacy_protocol(head: bytes | None) -> int | None:
    """The pickle protocol of a legacy (pre-zip) torch file from its first bytes; None: not one."""
    if head is None or head[:1] != b"\x80" or _LEGACY_MAGIC not in head[:32]:
        return None
    return head[1]


def _looks_like_torch(head: bytes) -> bool:
    return head.startswith(_ZIP_HEAD) or _legacy_protocol(head) is not None


def starts_like_torch(path: Path) -> bool:
    """Whether a file starts as ``torch.save`` writes (a zip archive, or a legacy pickle), whatever its suffix."""
    head = _head(path)
    return head is not None and _looks_like_torch(head)


def describe_load_error(err: BaseException, head: bytes | None = None) -> str:
    """What a ``torch.load(weights_only=True)`` failure means, in a few words (no PyTorch advice).

    ``head`` is the file's first bytes when known: a file that does not start like a torch file
    is "not a torch file" however the unpickler happened to fail on it.
    """
    text = str(err)
    if isinstance(err, IsADirectoryError):
        return "it is a directory, not a file"
    if isinstance(err, PermissionError):
        return "permission denied"
    if head == b"":
        return "the file is empty"
    if head is not None and not _looks_like_torch(head):
        return "it is not a torch file (unreadable pickle data)"
    if isinstance(err, EOFError):
        return "the file is empty or truncated"
    if "Unsupported operand" in text and (_legacy_protocol(head) or 0) >= 4:
        return ("it is a legacy (pre-zip) torch file pickled with protocol 4 or 5, which safe loading cannot "
                "read; re-save it with torch.save in PyTorch >= 1.6")
    found = _GLOBAL.search(text)
    if found:
        return f"it holds a pickled Python object ({found.group(1)}), not only tensors and plain data"
    if "zip archive" in text or "central directory" in text or "inline_container" in text:
        return "it is truncated or corrupt (its zip archive cannot be read)"
    if isinstance(err, _GARBAGE_PICKLE) or "Weights only load failed" in text or "magic number" in text:
        return "it is not a torch file (unreadable pickle data)"
    if isinstance(err, OSError):
        if head is not None and head.startswith(_ZIP_HEAD):  # torch seeks past the end of a cut archive (EINVAL)
            return "it is truncated or corrupt (its zip archive cannot be read)"
        return err.strerror or type(err).__name__
    first = text.splitlines()[0] if text else type(err).__name__
    return first[:200]


def torch_load_plain(
    path: str | Path,
    what: str,
    *,
    map_location: str | torch.device = "cpu",
    allowed: Iterable[type] = (),
) -> Any:
    """``torch.load(path, weights_only=True)``; any failure is a one-line :class:`UserError`.

    ``what`` names the file for the message (``"golden file"``, ``"VAE weights"``); ``allowed``
    are extra plain classes to accept (e.g. ``argparse.Namespace`` in DiT's checkpoints).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"{what} {path} does not exist")
    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals(list(allowed)):
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4": noise for a file we refuse anyway
            if path.suffix == ".safetensors":  # torch.load reads a path of that name as safetensors: a torch file
                with path.open("rb") as f:  # misnamed so (the caller sniffed its zip) is read from its bytes
                    return torch.load(f, map_location=map_location, weights_only=True)
            return torch.load(path, map_location=map_location, weights_only=True)
    except MemoryError:
        raise
    except Exception as err:  # torch raises many types for corrupt or non-weights files
        raise UserError(f"cannot read {what} {path}: {describe_load_error(err, _head(path))}") from None


def _head(path: Path) -> bytes | None:
    """The file's first 32 bytes, or None where it cannot be read."""
    try:
        with open(path, "rb") as f:
            return f.read(32)
    except OSError:
        return None
