"""The Python API: build models and components from recipes and registry names.

Everything here validates before it builds (see :mod:`zoo.validate`), so a mistake in a
recipe is a :class:`~zoo.errors.UserError` naming file, line and key, raised before any
weight is allocated. Importing this module does not import torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from . import registry
from .errors import UserError
from .recipe import Recipe, resolve
from .validate import TARGET_KEY, model_factory, resolve_component, validate_recipe

if TYPE_CHECKING:
    import torch
    from torch import nn

register = registry.register


def load_recipe(path: str | Path | dict | Recipe,
                overrides: Iterable[str] | Mapping[str, Any] = ()) -> dict[str, Any]:
    """The resolved recipe (``_base_`` merged, overrides applied: ``["model.depth=6"]`` as ``--set`` takes
    them, or ``{"model.depth": 6}``) as plain data, validated section by section. What is checked against
    the model it builds (a DiMR's time input, a learned variance, guidance's null label) is checked where the
    model is built: ``zoo build``, ``train``, ``sample`` (:func:`zoo.training.fit.check_recipe_fits_model`)."""
    recipe = resolve(path, overrides)
    validate_recipe(recipe)
    return recipe.data


def load_model_recipe(path: str | Path | dict | Recipe,
                      overrides: Iterable[str] | Mapping[str, Any] = ()) -> dict[str, Any]:
    """:func:`load_recipe` for a command that builds the recipe's model (train, sample, convert): one
    without a ``model`` section (a ``_base_`` file) is refused naming its file, not ``<recipe dict>``."""
    recipe = resolve(path, overrides)
    validate_recipe(recipe)
    model_factory(recipe)  # the model section is there and names a known backbone
    return recipe.data


def build_model(recipe: str | Path | dict | Recipe,
                overrides: Iterable[str] | Mapping[str, Any] = ()) -> "nn.Module":
    """Build the ``model`` section of a recipe (a path, a full recipe dict, a :class:`Recipe`, or the
    model section alone: ``{"type": "dimr", ...}`` or ``{"_target_": "pkg.module.Class", ...}``).

    ``overrides`` as in :func:`load_recipe`. Only the model section is checked and built; build under ``torch.device("meta")`` to
    count parameters of a large model without allocating it (in a fraction of a second: there
    PyTorch's ``nn.init`` would import Dynamo, 1-3 s, which :func:`zoo.meta.without_dynamo` avoids).
    """
    if isinstance(recipe, dict) and ("type" in recipe or TARGET_KEY in recipe):
        recipe = {"model": recipe}  # a bare model section: zoo.build_model({"type": "dimr", ...})
    resolved = resolve(recipe, overrides)
    validate_recipe(resolved, sections=())  # top-level section names only; the model is checked next
    factory = model_factory(resolved)
    import torch

    if torch.get_default_device().type == "meta":  # nothing random is drawn there: a rerun changes nothing
        from .meta import without_dynamo

        return without_dynamo(factory)
    return factory()


def from_checkpoint(path: str | Path, *, use_ema: bool = True,
                    device: "str | torch.device" = "cpu") -> "tuple[nn.Module, dict[str, Any]]":
    """The model of a zoo checkpoint directory and its resolved recipe: ``model, recipe =
    zoo.from_checkpoint("runs/demo")`` (a run directory stands for its newest checkpoint: ``last/``, or a ``step_*/`` saved after it).

    EMA weights when the checkpoint has them and ``use_ema`` (as ``zoo sample`` loads them), loaded
    strictly into the model its ``config.json`` describes; returned in eval mode (``.train()`` to go
    on training it). A component of an uninstalled plugin is an error naming that plugin.
    """
    import torch

    from .guards import resolve_device
    from .integrations.checkpoints import load_preferred

    # 'gpu', cuda without one, or meta (no weights would load): said before any file is read, str or torch.device
    device = resolve_device(str(device) if isinstance(device, torch.device) else device, option="device=")
    model, recipe, _ = load_preferred(path, use_ema, device)
    return model.eval(), recipe


def build_component(kind: str, spec: str | dict, **parent_kwargs: Any) -> Any:
    """Build one component from a spec (``NAME`` or ``{type: NAME, ...}``) plus what a parent would pass.

    Example: ``build_component("block", {"type": "transformer", "num_heads": 6}, dim=384)``.
    The parent's plain values (numbers, strings, lists) are checked with the spec, as a recipe's are
    (``dim=-3`` or a ``num_heads`` that does not divide ``dim`` is a UserError); factories and
    tensors are passed through.
    """
    kind = registry.check_kind(kind)
    fields = {"type": spec} if isinstance(spec, str) else dict(spec) if isinstance(spec, dict) else spec
    plain = {k: v for k, v in parent_kwargs.items() if _is_data(v)}
    if isinstance(fields, dict):
        clash = sorted(plain.keys() & fields.keys())
        if clash:
            raise UserError(f"{clash[0]} is given both in the {kind} spec and as an argument",
                            suggestion=f"give {clash[0]} once")
        fields = {**fields, **plain}
    else:
        plain = {}
    recipe = Recipe({}, source=f"<{kind} spec>")
    passed = {k: v for k, v in parent_kwargs.items() if k not in plain}
    factory = resolve_component(recipe, kind, fields, (), supplied=passed)
    return factory(**passed)


def _is_data(value: Any) -> bool:
    """Whether ``value`` is recipe-like data (checked against the domains), not an object to pass through."""
    if isinstance(value, (list, tuple)):
        return all(_is_data(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


def get_component(kind: str, name: str) -> Any:
    """The class registered as ``name`` of ``kind`` (imported on first use)."""
    return registry.get(kind, name)
