"""The run directory around the loop: which recipe changes a resume may carry, and old step pruning."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from zoo import atomic
from zoo.errors import UserError

FIXED_SECTIONS = ("model", "diffusion")  # what the weights and the loss mean; a resume may not change them


def first_difference(a: Any, b: Any, path: str) -> str | None:
    """The first key path (``model.depth``, ``model.branches.1.dim``) where ``a`` and ``b`` differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            if key not in a or key not in b:
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
    current = json.loads(json.dumps(recipe))  # the form config.json stores (tuples become lists)
    for section in FIXED_SECTIONS:
        path = first_difference(stored.get(section), current.get(section), section)
        if path:
            raise UserError(f"--resume {source}: the recipe's {path} differs from the checkpoint's "
                            f"({_value(stored, path)} there, {_value(current, path)} now)",
                            key_path=path, suggestion="resume with the checkpoint's recipe, or pass "
                            "--allow-recipe-change if the change is intended")


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


def prune_steps(out: Path, created: list[int], keep: int) -> list[int]:
    """Delete the oldest ``step_*`` directories this run created beyond the newest ``keep``; never ``last/``.

    Each is renamed aside first (:func:`zoo.atomic.delete_dir`), so a crash mid-delete leaves a
    leftover the next start removes, never half a checkpoint under a step name. Returns the steps still kept.
    """
    if keep <= 0 or len(created) <= keep:
        return created
    for step in created[:-keep]:
        directory = out / f"step_{step:07d}"
        atomic.delete_dir(directory)
    return created[-keep:]

