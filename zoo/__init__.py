"""zoo: a registry-driven architecture zoo for diffusion backbones (DiMR, U-ViT, DiT).

``import zoo`` is cheap (no torch; the API's modules, recipe parsing and validation, load on first
use, which ``zoo --help`` and the commands' parsers do not make); components are imported when a
recipe names them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import UserError

if TYPE_CHECKING:
    from . import api, domains, flops, introspect, recipe, recipe_yaml, registry, validate
    from .api import build_component, build_model, from_checkpoint, get_component, load_recipe, register

__all__ = ["build_component", "build_model", "from_checkpoint", "get_component", "load_recipe", "register",
           "UserError"]
_API = frozenset(__all__) - {"UserError"}
# the modules an eager import of the API bound as attributes of zoo: ``import zoo; zoo.registry`` still works
_SUBMODULES = frozenset({"api", "domains", "flops", "introspect", "recipe", "recipe_yaml", "registry", "validate"})


def _version() -> str:
    """The installed distribution's version (``unknown`` for a source tree that was never installed)."""
    from importlib import metadata

    from .registry import OWN_DISTRIBUTION

    try:
        return metadata.version(OWN_DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "unknown"


def __getattr__(name: str) -> Any:
    """``zoo.build_model`` and the other API functions, the modules above and ``__version__``, on first use."""
    if name == "__version__":
        return _version()
    if name in _API:
        from . import api

        value = getattr(api, name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    """What ``dir(zoo)`` and tab completion list: the lazily loaded API and modules too."""
    return sorted({*globals(), *_API, *_SUBMODULES, "__version__"})
