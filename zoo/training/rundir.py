"""The run directory around the loop: which recipe changes a resume may carry, and old step pruning."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from zoo import atomic
from zoo.errors import UserError

FIXED_SECTIONS = ("model", "diffusion")  # what the weights and the loss mean; a resume may not change them
#: Model keys that change only memory and time (recomputation), never the weights' meaning.
RUNTIME_MODEL_KEYS = frozenset({"grad_checkpointing", "use_checkpoint"})


def _as_table(a: Any, b: Any) -> tuple[Any, Any]:
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
    a, b = _as_table(a, b)  # NAME beside {type: NAME, ...}: compared as tables
    if isinstance(a, dict) and isinstance(b, dict):
        if a.get("type") != b.get("type"):
            return f"{path}.type"
        cls = _component(a["type"], kinds or NESTED_KINDS) if "type" in a else owner
        if defaults is None:
            defaults = _recipe_defaults(cls)
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


def fixed_section_changes(stored: dict, recipe: dict) -> list[tuple[str, str, str]]:
    """``(key path, value there, value now)`` of the first difference in each of the ``model`` and
    ``diffusion`` sections between a checkpoint's recipe ``stored`` and ``recipe``."""
    from zoo.diffusion.sections import DIFFUSION_DEFAULTS

    current = json.loads(json.dumps(recipe))  # the form config.json stores (tuples become lists)
    changes = []
    for section in FIXED_SECTIONS:
        then, now = stored.get(section), current.get(section)
        if section == "model":
            path = first_difference(_without_runtime_keys(then), _without_runtime_keys(now), section,
                                    kinds=("backbone",))
        else:
            path = first_difference(then, now, section, DIFFUSION_DEFAULTS)
        if path:
            changes.append((path, _value(stored, path), _value(current, path)))
    return changes


def check_resume_recipe(stored: dict, recipe: dict, source: Path) -> None:
    """Refuse a resume whose ``model`` or ``diffusion`` section differs from the checkpoint's."""
    changes = fixed_section_changes(stored, recipe)
    if changes:
        path, then, now = changes[0]
        raise UserError(f"--resume {source}: the recipe's {path} differs from the checkpoint's "
                        f"({then} there, {now} now)",
                        key_path=path, suggestion="resume with the checkpoint's recipe, or pass "
                        "--allow-recipe-change if the change is intended")


def _without_runtime_keys(model: Any) -> Any:
    """``model`` without the recomputation switches: a resume may turn them on or off."""
    return {k: v for k, v in model.items() if k not in RUNTIME_MODEL_KEYS} if isinstance(model, dict) else model


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


def _param_kinds(key: Any) -> tuple[str, ...]:
    """The kinds a component given as parameter ``key`` may be (its name says, else any nested kind)."""
    from zoo.validate import kind_of_param

    kind = kind_of_param(key) if isinstance(key, str) else None
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
    return {"kinds": _param_kinds(key), "owner": owner}


def _recipe_defaults(cls: Any) -> dict[str, Any]:
    """The constructor defaults of ``cls`` as a recipe writes them; ``{}`` if ``cls`` is unknown."""
    import inspect

    from zoo.introspect import signature

    sig = signature(cls) if cls is not None else None
    if sig is None:
        return {}
    out = {}
    for key, p in sig.parameters.items():
        if p.default is not inspect.Parameter.empty:
            value = _recipe_form(p.default, _param_kinds(key))
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

    target = f"{getattr(obj, '__module__', '')}:{getattr(obj, '__qualname__', '')}"
    found = set()
    for kind in kinds:
        for entry in registry.entries(kind):
            if entry.target != target:
                continue
            try:
                if entry.load() is obj:
                    found.add(entry.name)
            except UserError:
                continue
    return found.pop() if len(found) == 1 else None


def _plain(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def _value(recipe: dict, path: str) -> str:
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


def prune_steps(out: Path, created: list[int], keep: int, log: Callable[[str], None] = print) -> list[int]:
    """Delete the oldest ``step_*`` directories this run created beyond the newest ``keep``; never ``last/``.

    Each is renamed aside first (:func:`zoo.atomic.delete_dir`), so a crash mid-delete leaves a
    leftover the next start removes, never half a checkpoint under a step name. A directory that
    also holds files zoo did not write (a user's notes) is kept, with a note naming them, and no
    longer counted as the run's. Returns the steps still kept.
    """
    from zoo.checkpoint import foreign_files, is_checkpoint

    if keep <= 0 or len(created) <= keep:
        return created
    for step in created[:-keep]:
        directory = out / f"step_{step:07d}"
        if not directory.is_dir():
            continue
        if not is_checkpoint(directory):
            foreign = foreign_files(directory)
            why = (f"it also holds files zoo did not write ({', '.join(foreign[:5])})" if foreign
                   else "it is no longer a zoo checkpoint")
            log(f"zoo train: note: {directory} is kept, not pruned by train.keep_last: {why}")
            continue
        atomic.delete_dir(directory)
    return created[-keep:]

