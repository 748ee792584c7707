"""Where two recipes differ, read as the components they build: defaults filled in, names = tables.

A resume (``zoo train --resume``), a checkpoint loaded with other settings (``zoo sample --set``,
``timm.create_model(..., checkpoint_path=)``) all ask the same question: do these two sections build
the same thing? A key one side leaves out equals the other's value when that is the default.
"""

from __future__ import annotations

import json
from typing import Any

from zoo.errors import UserError

#: Model keys that leave what trained weights compute unchanged: the recomputation switches (memory and
#: time only), how a learned position table starts (the checkpoint's table replaces it) and DiT's label
#: dropout rate (a training setting, which zoo train replaces by diffusion.label_drop; whether it is 0, which
#: decides the null label's row, is a tensor shape strict loading checks).
NEUTRAL_MODEL_KEYS = frozenset({"grad_checkpointing", "use_checkpoint", "pos_embed_init", "class_dropout_prob"})


def model_difference(then: Any, now: Any) -> str | None:
    """The first key path where two ``model`` sections build different functions (``None``: the same)."""
    return first_difference(without_neutral_keys(then), without_neutral_keys(now), "model", kinds=("backbone",))


def without_neutral_keys(model: Any) -> Any:
    """``model`` without :data:`NEUTRAL_MODEL_KEYS` at its top level."""
    return {k: v for k, v in model.items() if k not in NEUTRAL_MODEL_KEYS} if isinstance(model, dict) else model


def as_table(a: Any, b: Any) -> tuple[Any, Any]:
    """A component given by name beside one given as a table: both as tables (``NAME`` is ``{type: NAME}``)."""
    if isinstance(a, str) and isinstance(b, dict) and "type" in b:
        return {"type": a}, b
    if isinstance(b, str) and isinstance(a, dict) and "type" in a:
        return a, {"type": b}
    return a, b


def first_difference(a: Any, b: Any, path: str, defaults: dict[str, Any] | None = None,
                     kinds: tuple[str, ...] | None = None, owner: Any = None) -> str | None:
    """The first key path (``model.depth``, ``model.branches.1.dim``) where ``a`` and ``b`` differ.

    A changed component is named by its ``type`` first. A component given by name equals one given
    as ``{type: NAME}``; a key that one side leaves out equals the other side's value if that is the
    default there: ``defaults[key]``, else the constructor default of the registered component the
    table names (``type``, one of ``kinds``), or of ``owner`` for a table without a type (a DiMR branch).
    """
    a, b = as_table(a, b)  # NAME beside {type: NAME, ...}: compared as tables
    if isinstance(a, dict) and isinstance(b, dict):
        if a.get("type") != b.get("type"):
            return f"{path}.type"
        cls = _component(a["type"], kinds or NESTED_KINDS) if "type" in a else owner
        if defaults is None:
            defaults = recipe_defaults(cls)
        for key in sorted(set(a) | set(b), key=str):
            child = _child(cls, key)
            if key not in a or key not in b:
                given = a[key] if key in a else b[key]
                if key in defaults and first_difference(given, defaults[key], f"{path}.{key}", **child) is None:
                    continue
                return f"{path}.{key}"
            found = first_difference(a[key], b[key], f"{path}.{key}", **child)
            if found:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            found = first_difference(x, y, f"{path}.{i}", kinds=kinds, owner=owner)
            if found:
                return found
        return None
    return None if a == b else path


#: The kinds a component inside the model or diffusion section may be.
NESTED_KINDS = ("block", "conditioner", "schedule", "solver")
_UNKNOWN = object()  # a default with no recipe form: a key left out beside a value counts as a change


def _component(name: Any, kinds: tuple[str, ...]) -> Any:
    """The class ``name`` registers in exactly one of ``kinds``; ``None`` when unknown or ambiguous."""
    from zoo import registry

    if not isinstance(name, str):
        return None
    found = [kind for kind in kinds if name in registry.Names(kind)]
    if len(found) != 1:
        return None
    try:
        return registry.get(found[0], name)
    except UserError:
        return None


def _param_kinds(key: Any, owner: Any = None) -> tuple[str, ...]:
    """The kinds a component given as parameter ``key`` (of class ``owner``, when known) may be: what its name
    says unless its annotation says plain data, else any nested kind."""
    from zoo.introspect import constructor_annotations
    from zoo.validate import kind_of_param

    if not isinstance(key, str):
        return NESTED_KINDS
    ann = constructor_annotations(owner).get(key, Any) if owner is not None else Any
    kind = kind_of_param(key, ann)
    return (kind,) if kind else NESTED_KINDS


def _child(cls: Any, key: Any) -> dict[str, Any]:
    """How to compare ``cls``'s parameter ``key``: its kinds, and the record class of a table (or
    list of tables) without a type there (``model.branches``: DiMR's ``BranchConfig``)."""
    from zoo.introspect import constructor_annotations, dataclass_in, item_annotation

    owner = None
    if cls is not None and isinstance(key, str):
        ann = constructor_annotations(cls).get(key)
        if ann is not None:
            owner = dataclass_in(ann) or dataclass_in(item_annotation(ann))
    return {"kinds": _param_kinds(key, cls), "owner": owner}


def recipe_defaults(cls: Any) -> dict[str, Any]:
    """The constructor defaults of ``cls`` as a recipe writes them; ``{}`` if ``cls`` is unknown."""
    import inspect

    from zoo.introspect import signature

    sig = signature(cls) if cls is not None else None
    if sig is None:
        return {}
    out = {}
    for key, p in sig.parameters.items():
        if p.default is not inspect.Parameter.empty:
            value = _recipe_form(p.default, _param_kinds(key, cls))
            if value is not _UNKNOWN:
                out[key] = value
    return out


def _recipe_form(value: Any, kinds: tuple[str, ...]) -> Any:
    """``value`` as a recipe writes it: a registered class as its name, ``partial(CLASS, **kw)``
    as ``{type: NAME, **kw}``, a JSON value as itself; else ``_UNKNOWN``."""
    import functools

    if _plain(value):
        return json.loads(json.dumps(value))
    if isinstance(value, functools.partial):
        name = _registered_name(value.func, kinds)
        if name is None or value.args:
            return _UNKNOWN
        table = {"type": name}
        for key, arg in value.keywords.items():
            table[key] = _recipe_form(arg, _param_kinds(key))
            if table[key] is _UNKNOWN:
                return _UNKNOWN
        return table
    name = _registered_name(value, kinds)
    return _UNKNOWN if name is None else name


def _registered_name(obj: Any, kinds: tuple[str, ...]) -> str | None:
    """The one name ``obj`` is registered under among ``kinds``; ``None`` if none or several."""
    from zoo import registry

    found = registry.names_of(obj, kinds)
    return found.pop() if len(found) == 1 else None


def _plain(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def value_at(recipe: dict, path: str) -> str:
    """The value at ``path`` as JSON, or ``absent``; a component given by name has that name as its type."""
    node: Any = recipe
    parts = path.split(".")
    for i, part in enumerate(parts):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif not (isinstance(node, str) and part == "type" and i == len(parts) - 1):
            return "absent"
    return json.dumps(node)
