"""The run directory around the loop: which recipe changes a resume may carry, and old step pruning."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from zoo import atomic
from zoo.errors import UserError
from zoo.recipe_diff import first_difference, model_difference, value_at

FIXED_SECTIONS = ("model", "diffusion")  # what the weights and the loss mean; a resume may not change them


def fixed_section_changes(stored: dict, recipe: dict) -> list[tuple[str, str, str]]:
    """``(key path, value there, value now)`` of the first difference in each of the ``model`` and
    ``diffusion`` sections between a checkpoint's recipe ``stored`` and ``recipe``."""
    from zoo.diffusion.sections import DIFFUSION_DEFAULTS, with_component_defaults

    current = json.loads(json.dumps(recipe))  # the form config.json stores (tuples become lists)
    changes = []
    for section in FIXED_SECTIONS:
        then, now = stored.get(section), current.get(section)
        if section == "model":
            path = model_difference(then, now)
        else:
            # logit_normal is its {type, mean, std}: a default written out is no change
            filled = [with_component_defaults(d) if isinstance(d, dict) else d for d in (then, now)]
            path = first_difference(*filled, section, DIFFUSION_DEFAULTS)
        if path:
            changes.append((path, value_at(stored, path), value_at(current, path)))
    return changes


def check_resume_recipe(stored: dict, recipe: dict, source: Path, misfit: str = "",
                        allowed: bool = False) -> list[tuple[str, str, str]]:
    """Refuse a resume whose ``model`` or ``diffusion`` section differs from the checkpoint's, unless
    ``allowed`` (``--allow-recipe-change``); never one whose weights then do not fit the model: ``misfit``
    is how they do not (:func:`zoo.weights.key_mismatch`), for a changed width or depth has no resume.
    Returns the changes an allowed resume goes on with."""
    changes = fixed_section_changes(stored, recipe)
    if changes and misfit:
        model = [c for c in changes if c[0].startswith("model.")] or changes
        said = ", ".join(f"{path} ({then} there, {now} now)" for path, then, now in model)
        one = "s" * (len(model) == 1)
        raise UserError(f"--resume {source}: the recipe's {said} differ{one} from the checkpoint's and change{one} "
                        f"the shapes of its weights ({misfit}): a model of another shape cannot continue these "
                        "weights (--allow-recipe-change applies only to changes that keep them)", key_path=model[0][0],
                        suggestion="keep the model section as the run had it ("
                        + ", ".join(f"{path}: {then}" for path, then, _ in model) + ") to resume, or start a "
                        "new run with another --out")
    if changes and not allowed:
        path, then, now = changes[0]
        raise UserError(f"--resume {source}: the recipe's {path} differs from the checkpoint's "
                        f"({then} there, {now} now)",
                        key_path=path, suggestion="resume with the checkpoint's recipe, or pass "
                        "--allow-recipe-change if the change is intended (it keeps the weights' shapes)")
    return changes


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

