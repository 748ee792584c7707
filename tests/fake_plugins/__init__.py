"""Fake third-party distributions for the registry tests (this folder goes on ``sys.path``).

* ``zoo-fake-plugin``: block ``fake_block`` and backbone ``fake_net`` (entry points only);
* ``zoo-broken-plugin``: block ``broken_block``, whose module raises ImportError.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Iterator

from zoo import registry

PLUGIN_DIR = Path(__file__).resolve().parent
PLUGIN_MODULES = ("zoo_fake_plugin", "zoo_broken_plugin")


@contextlib.contextmanager
def on_sys_path(*folders: Path) -> Iterator[None]:
    """Make the distributions in ``folders`` (default: the fake plugins) visible, then remove them again."""
    folders = tuple(str(f) for f in folders or (PLUGIN_DIR,))
    sys.path[:0] = folders
    registry.refresh()
    try:
        yield
    finally:
        for folder in folders:
            sys.path.remove(folder)
        for name in PLUGIN_MODULES:
            sys.modules.pop(name, None)
        registry.refresh()


def write_distribution(folder: Path, name: str, entry_points: str) -> Path:
    """Write a minimal installed distribution (``NAME-0.1.dist-info``) declaring ``entry_points``."""
    info = folder / f"{name.replace('-', '_')}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(entry_points)
    return folder
