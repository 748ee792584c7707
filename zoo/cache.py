"""Where zoo keeps what it can rebuild: the emoji32 tensors, reference feature statistics."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$ZOO_CACHE``, else ``$XDG_CACHE_HOME/zoo``, else ``~/.cache/zoo``.

    A relative ``XDG_CACHE_HOME`` is ignored, as the XDG base-directory specification says: the cache
    would move with the current directory."""
    explicit = os.environ.get("ZOO_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = Path(os.environ.get("XDG_CACHE_HOME") or "").expanduser()
    return (xdg if xdg.is_absolute() else Path.home() / ".cache") / "zoo"
