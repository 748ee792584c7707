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


def _same_component(a: Any, b: Any) -> bool:
    """``"eps_mse"`` and ``{type: eps_mse}`` name the same component (the recipes' shorthand)."""
    return (isinstance(a, str) and b == {"type": a}) or (isinstance(b, str) and a == {"type": b})


def _as_table(a: Any, b: Any) -> tuple[Any, Any]:
    """A component given by name beside one given as a table: both as tables (``NAME`` is ``{type: NAME}``)."""
    if isinstance(a, str) and isinstance(b, dict) and b.get("type") == a:
        return {"type": a}, b
    if isinstance(b, str) and isinstance(a, dict) and a.get("type") == b:
        return a, {"type": b}
    return a, b


def first_difference(a: Any, b: Any, path: str, defaults: dict[str, Any] | None = None) -> str | None:
    """The first key path (``model.depth``, ``model.branches.1.dim``) where ``a`` and ``b`` differ.

    A component given by name equals one given as ``{type: NAME}``; a key that one side leaves out
    equals the other side's value if that is ``defaults[key]``: the given defaults, else those of
    the registered block, conditioner, schedule or solver both sides name (``type``).
    """
    a, b = _as_table(a, b)  # NAME beside {type: NAME, ...}: compared as tables
    if isinstance(a, dict) and isinstance(b, dict):
        if defaults is None and a.get("type") == b.get("type"):
            defaults = _component_defaults(a.get("type"))
        for key in sorted(set(a) | set(b), key=str):
            if key not in a or key not in b:
                given = a[key] if key in a else b[key]
                if defaults is not None and key in defaults and (given == defaults[key]
                                                                 or _same_component(given, defaults[key])):
                    continue
                return f"{path}.{key}"
            found = first_difference(a[key], b[key], f"{path}.{key}")
            if found:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            found = first_difference(x, y, f"{path}.{i}")
            if found:
                return found
        return None
    return None if a == b else path


def check_resume_recipe(stored: dict, recipe: dict, source: Path) -> None:
    """Refuse a resume whose ``model`` or ``diffusion`` section differs from the checkpoint's."""
    from zoo.diffusion.sections import DIFFUSION_DEFAULTS

    current = json.loads(json.dumps(recipe))  # the form config.json stores (tuples become lists)
    for section in FIXED_SECTIONS:
        then, now = stored.get(section), current.get(section)
        if section == "model":
            then, now = _without_runtime_keys(then), _without_runtime_keys(now)
        defaults = _constructor_defaults(now) if section == "model" else DIFFUSION_DEFAULTS
        path = first_difference(then, now, section, defaults)
        if path:
            raise UserError(f"--resume {source}: the recipe's {path} differs from the checkpoint's "
                            f"({_value(stored, path)} there, {_value(current, path)} now)",
                            key_path=path, suggestion="resume with the checkpoint's recipe, or pass "
                            "--allow-recipe-change if the change is intended")


def _without_runtime_keys(model: Any) -> Any:
    """``model`` without the recomputation switches: a resume may turn them on or off."""
    return {k: v for k, v in model.items() if k not in RUNTIME_MODEL_KEYS} if isinstance(model, dict) else model


def _constructor_defaults(model: Any) -> dict[str, Any]:
    """The defaults of the registered backbone's constructor (JSON values), ``{}`` if unknown."""
    if not isinstance(model, dict):
        return {}
    return _component_defaults(model.get("type"), kinds=("backbone",))


#: The kinds a component inside the model or diffusion section may be.
NESTED_KINDS = ("block", "conditioner", "schedule", "solver")


def _component_defaults(name: Any, kinds: tuple[str, ...] = NESTED_KINDS) -> dict[str, Any] | None:
    """The constructor defaults (JSON values) of the component ``name`` registers in exactly one of
    ``kinds``; ``None`` when it is unknown or ambiguous (then a left-out key counts as a change)."""
    import inspect

    from zoo import registry
    from zoo.introspect import signature

    if not isinstance(name, str):
        return None
    found = [kind for kind in kinds if name in registry.Names(kind)]
    if len(found) != 1:
        return None
    try:
        sig = signature(registry.get(found[0], name))
    except UserError:
        return None
    if sig is None:
        return None
    return {key: json.loads(json.dumps(p.default)) for key, p in sig.parameters.items()
            if p.default is not inspect.Parameter.empty and _plain(p.default)}


def _plain(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def _value(recipe: dict, path: str) -> str:
    node: Any = recipe
    for part in path.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
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

