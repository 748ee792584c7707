"""Every shipped recipe as a timm model: ``import zoo.integrations.timm``, then ``timm.create_model``.

    import timm, zoo.integrations.timm
    timm.list_models("zoo_*")                                   # zoo_dimr_xl_2r, zoo_dit_s_2, ...
    model = timm.create_model("zoo_dit_s_2", depth=6)           # = zoo.build_model("dit_s_2", ["model.depth=6"])
    model = timm.create_model("zoo_dit_s_2", checkpoint_path="runs/dit_s/last")   # a zoo checkpoint directory

timm (1.0) finds models only through ``@register_model`` functions in imported modules (it reads
no entry points), so importing this module is what registers them. Each recipe
``recipes/A/B.yaml`` (``_base_*`` excluded, subfolders included) becomes ``zoo_A_B``. Keyword
arguments are ``model.KEY=VALUE`` overrides, checked like ``--set`` (a typo is the same
:class:`~zoo.errors.UserError`); ``"branches.0.depth"`` reaches nested keys (pass it with ``**{}``).
zoo models have no downloadable weights: ``pretrained=True`` is an error. ``checkpoint_path=``
may name a zoo checkpoint directory: its EMA weights (timm's ``use_ema`` default) or else its
model weights load strictly. For that, this module wraps the ``load_checkpoint`` that
``timm.create_model`` calls; every other path goes to timm's loader unchanged.
"""

from __future__ import annotations

import contextlib
import functools
import json
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import timm
import torch
from timm.models import _factory
from torch import nn

import zoo
from zoo.errors import UserError
from zoo.integrations.checkpoints import load_preferred
from zoo.recipe import mapping_overrides, resolve, shipped_recipe_names

PREFIX = "zoo_"


def shipped_recipes() -> dict[str, str]:
    """``{timm name: recipe file}`` for every recipe shipped in ``zoo.recipes`` (``_base_*`` excluded)."""
    found: dict[str, str] = {}
    shipped = resources.files("zoo.recipes")
    for recipe in shipped_recipe_names():  # emoji32/dit.yaml -> zoo_emoji32_dit
        name, path = PREFIX + recipe[: -len(".yaml")].replace("/", "_"), str(shipped.joinpath(recipe))
        if name in found:
            raise RuntimeError(f"recipes {found[name]} and {path} would both be timm model {name}")
        found[name] = path
    return found


def model_overrides(kwargs: dict[str, Any]) -> list[str]:
    """``{"depth": 6}`` -> ``["model.depth=6"]``: keyword arguments as ``--set`` overrides of the model section."""
    return mapping_overrides(kwargs, prefix="model.")


def create(name: str, recipe: str, pretrained: bool = False, pretrained_cfg: Any = None,
           pretrained_cfg_overlay: dict | None = None, cache_dir: Any = None, device: Any = None,
           dtype: torch.dtype | None = None, **options: Any) -> nn.Module:
    """Build ``recipe``'s model with ``options`` as model overrides (what ``timm.create_model(name)`` calls)."""
    if pretrained or pretrained_cfg is not None or pretrained_cfg_overlay is not None:
        raise UserError(f"{name} has no downloadable weights (pretrained=True, pretrained_cfg); zoo downloads "
                        "nothing",
                        suggestion="pass checkpoint_path=DIR, a zoo checkpoint directory (zoo train/convert write one)")
    overrides = model_overrides(options)
    try:
        resolved = resolve(recipe, overrides)
        with torch.device(device) if device is not None else contextlib.nullcontext():
            model = zoo.build_model(resolved)
    except UserError as err:
        raise _relabel(err, name, overrides, options)
    model._zoo_model_section = resolved.data["model"]  # compared with a checkpoint's recipe when one is loaded
    model._zoo_keywords = set(options)  # which of its settings the caller gave (the rest: the recipe's)
    example = getattr(model, "example_inputs", None)
    shape = tuple(example(1)[0].shape[1:]) if example else None
    # what timm's own models carry (timm.data.resolve_model_data_config reads it). zoo models take [-1, 1]
    # pixels (mean = std = 0.5 on [0, 1] images) or VAE latents (no normalisation): left out, timm would fill
    # in ImageNet's mean and std
    model.pretrained_cfg = {"architecture": name, "input_size": shape,
                            "num_classes": getattr(model, "num_classes", None), "source": f"zoo recipe {recipe}"}
    if shape is not None:
        from zoo.training.data import gives_latents

        latent = gives_latents(resolved.data.get("data") or {})
        model.pretrained_cfg.update(mean=(0.0 if latent else 0.5,) * shape[0], std=(1.0 if latent else 0.5,) * shape[0],
                                    crop_pct=1.0)  # the whole centre square, as zoo's image folders and ADM crop
    return model if dtype is None else model.to(dtype)


def _relabel(err: UserError, name: str, overrides: list[str], options: dict[str, Any]) -> UserError:
    """Say ``timm.create_model('zoo_x', key=...)`` where the error says ``--set model.key=...``."""
    for text, key in zip(overrides, options):
        if err.file == f"--set {text}":
            err.file = f"timm.create_model({name!r}, {key}=...)"
    return err


def is_zoo_checkpoint(path: Any) -> bool:
    """Whether ``path`` is a directory holding a zoo checkpoint's ``config.json``, or a run directory (one in
    its ``last/`` or its ``step_*/``: without ``last/``, loading it names the newest step to pass)."""
    from zoo.checkpoint import CONFIG

    if not (isinstance(path, (str, Path)) and Path(path).is_dir()):
        return False
    run = Path(path)
    return (run / CONFIG).is_file() or (run / "last" / CONFIG).is_file() or any(
        (step / CONFIG).is_file() for step in run.glob("step_*"))


def load_zoo_checkpoint(model: nn.Module, directory: str | Path, use_ema: bool = True) -> None:
    """Load a zoo checkpoint directory into ``model`` strictly (EMA weights if ``use_ema`` and present).

    Strict twice over: the tensors must match, and so must the recipe settings that keep the shapes but
    change what the weights compute (``num_heads``, an activation): a model built with ``num_heads=4``
    takes a 2-head checkpoint's tensors and gives other outputs."""
    from zoo.weights import load_state_dict_strict
    from zoo.recipe_diff import model_difference

    saved, config, weights = load_preferred(directory, use_ema)
    built = getattr(model, "_zoo_model_section", None)
    path = model_difference(config.get("model"), built) if built is not None else None
    differs = "" if path is None else (f"{path} is {shown_value(config, path)} in its recipe, "
                                       f"{shown_value({'model': built}, path)} in this model's")
    try:
        load_state_dict_strict(model, saved.state_dict(), f"{directory} ({weights} weights)")
    except UserError as err:
        if differs:
            err.message += "; the checkpoint was written for another model: " + differs
            err.args = (err.message,)
        raise
    if differs:
        key = path.split(".", 1)[1]
        keywords = getattr(model, "_zoo_keywords", set())  # "branches.0.depth" may come as itself or in "branches"
        given = key in keywords or key.split(".")[0] in keywords
        raise UserError(f"checkpoint_path {directory}: {differs}; its weights fit this model's tensors but "
                        "would compute something else", key_path=path,
                        suggestion=f"create the model with the checkpoint's {key}, or without that keyword" if given
                        else f"pass {key}={shown_value(config, path).removesuffix(' (the default)')} (the recipe's own value is not the checkpoint's)")


_NO_DEFAULT = object()


def shown_value(recipe: dict, path: str) -> str:
    """The value at ``path`` (``model.block.qkv_bias``) as JSON; a key the recipe leaves out is its
    component's default, said as such (``true (the default)``): 'absent' read as if it were unset."""
    from zoo.recipe_diff import value_at

    shown = value_at(recipe, path)
    if shown != "absent":
        return shown
    default = _default_at(recipe.get("model"), path.split(".")[1:])
    return shown if default is _NO_DEFAULT else f"{json.dumps(default)} (the default)"


def _default_at(model: Any, keys: list[str]) -> Any:
    """The constructor default of the last of ``keys`` in the component the ``model`` section builds
    there; :data:`_NO_DEFAULT` when it has none or cannot be told."""
    from zoo.recipe_diff import _child, _component, recipe_defaults

    if not isinstance(model, dict) or not keys:
        return _NO_DEFAULT
    node, cls, item_cls = model, _component(model.get("type"), ("backbone",)), None
    for key in keys[:-1]:
        if isinstance(node, list):  # a list of records (DiMR's branches): each item is one
            node = node[int(key)] if key.isdigit() and int(key) < len(node) else None
            cls = item_cls
            continue
        child = _child(cls, key)
        value = node.get(key) if key in node else recipe_defaults(cls).get(key)
        value = {"type": value} if isinstance(value, str) else value  # a component given by its name
        if isinstance(value, list):
            node, item_cls = value, child["owner"]
        elif isinstance(value, dict):
            node = value
            cls = _component(value["type"], child["kinds"]) if "type" in value else child["owner"]
        else:
            return _NO_DEFAULT
    if not isinstance(node, dict) or cls is None:
        return _NO_DEFAULT
    return recipe_defaults(cls).get(keys[-1], _NO_DEFAULT)


def _wrap_timm_loader() -> None:
    """Let ``timm.create_model(..., checkpoint_path=DIR)`` load zoo checkpoint directories (others: timm's loader)."""
    original = _factory.load_checkpoint
    if getattr(original, "zoo_wrapper", False):
        return

    @functools.wraps(original)
    def load_checkpoint(model: nn.Module, checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(checkpoint_path, (str, Path)) and not Path(checkpoint_path).expanduser().exists():
            raise UserError(f"checkpoint_path {checkpoint_path} does not exist",  # timm: FileNotFoundError, no message
                            suggestion="pass a zoo checkpoint directory (zoo train and zoo convert write one)")
        if not is_zoo_checkpoint(checkpoint_path):
            return original(model, checkpoint_path, *args, **kwargs)
        load_zoo_checkpoint(model, checkpoint_path, use_ema=kwargs.get("use_ema", args[0] if args else True))
        return None

    load_checkpoint.zoo_wrapper = True  # type: ignore[attr-defined]
    _factory.load_checkpoint = load_checkpoint


def _entrypoint(name: str, recipe: str) -> Callable[..., nn.Module]:
    def entrypoint(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        return create(name, recipe, pretrained=pretrained, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = name  # timm registers a function under its __name__
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"zoo recipe {recipe} as a timm model; keyword arguments override its model section."
    return entrypoint


def register_all() -> list[str]:
    """Register every shipped recipe with timm (again after a reload: same names, no duplicates)."""
    names = []
    for name, recipe in shipped_recipes().items():
        if not (timm.is_model(name) and timm.models.model_entrypoint(name).__module__ == __name__):
            globals()[name] = timm.models.register_model(_entrypoint(name, recipe))
        names.append(name)
    return names


_wrap_timm_loader()
MODEL_NAMES: list[str] = register_all()
