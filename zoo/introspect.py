"""What a constructor accepts, read from its signature and annotations (for recipe checks and listings).

Annotations may be strings (``from __future__ import annotations``); they are evaluated in the
defining module, and one that cannot be evaluated is left out (that parameter goes unchecked).
"""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import inspect
import sys
import types
import typing
from typing import Any

from .domains import fits, options, strip


@functools.lru_cache(maxsize=None)
def signature(obj: Any) -> inspect.Signature | None:
    try:
        return inspect.signature(obj)
    except (TypeError, ValueError):
        return None


def backbone_defaults(model: Any) -> dict[str, Any]:
    """The constructor defaults of a recipe ``model`` section's registered backbone: what a key the
    section leaves out means. ``{}`` for a ``_target_`` model, an unknown type or one that fails to load."""
    from zoo import registry

    try:
        sig = signature(registry.get("backbone", model.get("type")))
    except Exception:  # noqa: BLE001 - a _target_ or plugin model: nothing known here
        return {}
    return {} if sig is None else {name: p.default for name, p in sig.parameters.items() if p.default is not p.empty}


def positional_names(obj: Any, count: int) -> list[str]:
    sig = signature(obj)
    if sig is None or not count:
        return []
    positional = [n for n, p in sig.parameters.items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return positional[:count]


@functools.lru_cache(maxsize=None)
def constructor_annotations(obj: Any) -> dict[str, Any]:
    """Evaluated constructor annotations; ones that cannot be evaluated are left out (unchecked)."""
    target = obj if dataclasses.is_dataclass(obj) or not isinstance(obj, type) else obj.__init__
    try:
        return typing.get_type_hints(target, include_extras=True)
    except Exception:
        pass
    namespace = vars(sys.modules.get(getattr(obj, "__module__", ""), types.ModuleType("_")))
    out = {}
    for key, ann in getattr(target, "__annotations__", {}).items():
        try:
            out[key] = eval(ann, namespace) if isinstance(ann, str) else ann  # what get_type_hints does, per name
        except Exception:
            continue
    return out


def _options(ann: Any) -> tuple:
    """The members of a Union / Optional, without their domains, or ``(ann,)``."""
    return tuple(strip(a) for a in options(strip(ann)))


def dataclass_in(ann: Any) -> type | None:
    return next((a for a in _options(ann) if isinstance(a, type) and dataclasses.is_dataclass(a)), None)


def item_annotation(ann: Any) -> Any:
    for option in _options(ann):
        if typing.get_origin(option) in (list, tuple, collections.abc.Sequence) and typing.get_args(option):
            return typing.get_args(option)[0]
    return Any


def is_factory_type(ann: Any) -> bool:
    return any(a is type or typing.get_origin(a) in (type, collections.abc.Callable) or a is collections.abc.Callable
               for a in _options(ann))


def check_type(value: Any, ann: Any) -> bool:
    """Whether ``value`` (as YAML gives it) has the type of ``ann``, domains aside; annotations not
    worth checking pass."""
    return fits(value, ann, domains=False)


def type_name(ann: Any) -> str:
    ann = strip(ann)
    if typing.get_origin(ann) in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(ann))
    if ann is type(None):
        return "null"
    if typing.get_origin(ann) is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(ann))
    if isinstance(ann, type) and dataclasses.is_dataclass(ann):  # a record of settings, e.g. one DiMR branch
        return "mapping"
    if dataclass_in(item_annotation(ann)):
        return "list of mappings"
    if isinstance(ann, type) and typing.get_origin(ann) is None:
        return ann.__name__
    return str(ann).replace("typing.", "")
