"""The Python API: build models and components from recipes and registry names.

Everything here validates before it builds (see :mod:`zoo.validate`), so a mistake in a
recipe is a :class:`~zoo.errors.UserError` naming file, line and key, raised before any
weight is allocated. Importing this module does not import torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from . import registry
from .recipe import Recipe, resolve
from .validate import TARGET_KEY, model_factory, resolve_component, validate_recipe

if TYPE_CHECKING:
    from torch import nn

register = registry.register


def load_recipe(path: str | Path | dict | Recipe, overrides: Iterable[str] = ()) -> dict[str, Any]:
    """The resolved recipe (``_base_`` merged, ``key=VALUE`` overrides applied) as plain data, validated."""
    recipe = resolve(path, overrides)
    validate_recipe(recipe)
    return recipe.data


def build_model(recipe: str | Path | dict | Recipe, overrides: Iterable[str] = ()) -> "nn.Module":
    """Build the ``model`` section of a recipe (a path, a full recipe dict, a :class:`Recipe`, or the
    model section alone: ``{"type": "dimr", ...}`` or ``{"_target_": "pkg.module.Class", ...}``).

    Only the model section is checked and built; build under ``torch.device("meta")`` to
    count parameters of a large model without allocating it.
    """
    if isinstance(recipe, dict) and ("type" in recipe or TARGET_KEY in recipe):
        recipe = {"model": recipe}  # a bare model section: zoo.build_model({"type": "dimr", ...})
    resolved = resolve(recipe, overrides)
    validate_recipe(resolved, sections=())  # top-level section names only; the model is checked next
    return model_factory(resolved)()


def build_component(kind: str, spec: str | dict, **parent_kwargs: Any) -> Any:
    """Build one component from a spec (``NAME`` or ``{type: NAME, ...}``) plus what a parent would pass.

    Example: ``build_component("block", {"type": "transformer", "num_heads": 6}, dim=384)``.
    """
    recipe = Recipe({}, source=f"<{kind} spec>")
    factory = resolve_component(recipe, registry.check_kind(kind), spec, (), supplied=parent_kwargs)
    return factory(**parent_kwargs)


def get_component(kind: str, name: str) -> Any:
    """The class registered as ``name`` of ``kind`` (imported on first use)."""
    return registry.get(kind, name)
