"""Converters from official checkpoints (DiT, U-ViT, DiMR) to zoo models.

A family is a module beside this one that defines:

* ``official_config_to_model_spec(config: dict) -> dict``: the official constructor kwargs as
  a recipe ``model`` section (``{"type": ..., ...}``), so ``zoo.build_model({"model": spec})``
  builds the matching zoo model;
* ``convert_state_dict(state_dict: dict, config: dict) -> dict``: official keys/tensors to the
  zoo model's; every official key must be consumed (an unknown one is an error);
* optionally ``model_inputs(inputs: dict) -> tuple``: a golden file's ``inputs`` as the
  arguments of ``model(x, t, y)`` (default ``(x, t, y)``);
* optionally ``matches_config(config: dict) -> bool``: whether an official config is of this
  family (lets ``zoo parity`` infer the family);
* optionally ``MODEL_TYPE``: the recipe ``model.type`` it converts into (default: the family's name);
* optionally ``official_keys(name: str, config) -> list[str]``: the official key(s) a zoo key comes from,
  so that ``zoo convert`` names a missing or mis-shaped tensor as the official file does;
* optionally ``explain_shapes(state, expected, recipe)``: raise a clearer error than a key list where a
  shape says which setting differs (DiT's ``pos_embed`` length: the input size).

Families are listed in :data:`FAMILIES` (name -> module) and imported only when used.
"""

from __future__ import annotations

import importlib
import json
from types import ModuleType
from typing import Any, Mapping

from torch import Tensor

from zoo.errors import UserError

FAMILIES: dict[str, str] = {
    "dit": "zoo.convert.dit",
    "uvit": "zoo.convert.uvit",
    "dimr": "zoo.convert.dimr",
}

# Wrappers the official training scripts put around a state dict, in order of preference.
_WRAPPER_KEYS = ("ema", "model", "state_dict")
# Prefixes a training wrapper adds to every key: DistributedDataParallel, torch.compile.
_KEY_PREFIXES = ("module.", "_orig_mod.")
# A key each family's official state dict has and the others' do not: names the family of a file.
_SIGNATURE_KEYS = {"dit": "x_embedder.proj.weight", "uvit": "mid_block.norm1.weight",
                   "dimr": "stages.0.input_layer.1.weight"}


def guess_family(state: Mapping[str, Any]) -> str | None:
    """The family whose official keys ``state`` has, ``None`` when it looks like none of them."""
    found = [name for name, key in _SIGNATURE_KEYS.items() if key in state]
    return found[0] if len(found) == 1 else None


def get_family(name: str) -> ModuleType:
    """The converter module of a family, e.g. ``get_family("dit")``."""
    if name not in FAMILIES:
        raise UserError(f"unknown model family {name!r}; choose one of {', '.join(sorted(FAMILIES))}")
    try:
        return importlib.import_module(FAMILIES[name])
    except ModuleNotFoundError as err:
        if err.name == FAMILIES[name]:
            raise UserError(f"the {name} converter ({FAMILIES[name]}) is not available in this install") from None
        raise


def infer_family(config: Mapping[str, Any], hint: str = "") -> str:
    """A family from an official config or, where no single family's config matches, from a file name
    (``golden_dit_tiny.pt``). The config first: a U-ViT golden file copied to ``dit_baseline.pt`` is U-ViT."""
    matching = []
    for name in FAMILIES:
        try:
            family = get_family(name)
        except UserError:
            continue
        if getattr(family, "matches_config", lambda c: False)(config):
            matching.append(name)
    if len(matching) == 1:
        return matching[0]
    tokens = set(hint.lower().replace("-", "_").replace(".", "_").split("_"))
    named = [name for name in FAMILIES if name in tokens]
    if len(named) == 1:
        return named[0]
    raise UserError(f"cannot tell the model family of {hint or 'this file'}; pass --family {{{','.join(FAMILIES)}}}")


def check_recipe_family(family_name: str, family: ModuleType, model: Any, source: str) -> None:
    """The recipe must build the family's model: else strict loading would list every key as missing."""
    expected = getattr(family, "MODEL_TYPE", family_name)
    given = model.get("type") if isinstance(model, Mapping) else None
    if given != expected:
        raise UserError(f"{source} is converted as {family_name}, but the recipe builds a {given} model",
                        key_path="model.type", suggestion=f"give a {expected} recipe (--recipe), or the family of "
                        f"this checkpoint as the first argument")


def model_spec(family: ModuleType, config: Mapping[str, Any], source: str = "the official config") -> dict:
    """``family.official_config_to_model_spec(config)``; a missing or malformed key is one line naming it."""
    try:
        return family.official_config_to_model_spec(config)
    except KeyError as err:
        raise UserError(f"{source} lacks the key {err.args[0]!r} that the official constructor needs") from None
    except (TypeError, ValueError, AttributeError) as err:
        raise UserError(f"{source} is malformed: {err}") from None


def check_recipe_matches(spec: Any, model: Any, path: str = "model") -> None:
    """Every setting the official config fixes must agree with the recipe's: stated there, or left at
    the backbone's default (DiMR's ``block_grad_to_lowres`` against a recipe that leaves
    ``detach_handed`` out, say).

    Strict weight loading catches a different shape; this catches what keeps the shapes, such
    as ``num_heads`` or ``mlp_ratio``. Below the top level, keys only one side states are not compared.
    A component given by name equals ``{type: NAME}``; settings that leave what the weights compute
    unchanged (U-ViT's ``use_checkpoint``, which every released config sets) are not compared.
    """
    from zoo.recipe_diff import NEUTRAL_MODEL_KEYS, as_table

    spec, model = as_table(spec, model)  # NAME beside {type: NAME, ...}
    if isinstance(spec, Mapping) and isinstance(model, Mapping):
        from zoo.introspect import backbone_defaults

        defaults = backbone_defaults(model) if path == "model" else {}
        for key in spec:
            if path == "model" and key in NEUTRAL_MODEL_KEYS:
                continue
            if key in model:
                check_recipe_matches(spec[key], model[key], f"{path}.{key}")
            elif (key in defaults and isinstance(defaults[key], (bool, int, float, str))  # plain settings only
                  and not _same_setting(key, spec[key], defaults[key])):
                raise UserError(f"the recipe leaves {path}.{key} at its default {defaults[key]!r}, the official "
                                f"config says {spec[key]!r}", key_path=f"{path}.{key}",
                                suggestion=f"--set {path}.{key}={json.dumps(spec[key])}")
        return
    if isinstance(spec, (list, tuple)) and isinstance(model, (list, tuple)):
        if len(spec) != len(model):
            raise UserError(f"the recipe's {path} has {len(model)} entries, the official config {len(spec)}",
                            key_path=path, suggestion="use the recipe of this checkpoint's model")
        for i, (a, b) in enumerate(zip(spec, model)):
            check_recipe_matches(a, b, f"{path}.{i}")
        return
    if not _same_setting(path.rsplit(".", 1)[-1], spec, model):
        raise UserError(f"the recipe says {model!r}, the official config {spec!r}", key_path=path,
                        suggestion="use the recipe of this checkpoint's model, or --set it")


def _unconditional(num_classes: Any) -> bool:
    return isinstance(num_classes, int) and not isinstance(num_classes, bool) and num_classes <= 0


def _same_setting(key: str, official: Any, ours: Any) -> bool:
    """Equal, or both unconditional: U-ViT's any ``num_classes <= 0`` (the official -1, a recipe's 0)."""
    return official == ours or (key == "num_classes" and _unconditional(official) and _unconditional(ours))


def unwrap_state_dict(obj: Any, source: str = "checkpoint", prefer: str | None = None) -> dict[str, Tensor]:
    """The state dict inside an official checkpoint: a raw one, or under ``ema`` / ``model`` / ``state_dict``.

    ``prefer`` picks one wrapper key (e.g. ``"model"`` for non-EMA weights); otherwise EMA wins,
    as the released DiT checkpoints are the EMA weights.
    """
    if not isinstance(obj, Mapping):
        raise UserError(f"{source} does not hold a state dict (found {type(obj).__name__})")
    if obj and all(isinstance(v, Tensor) for v in obj.values()):
        return _without_wrapper_prefixes(obj)
    keys = (prefer,) if prefer else _WRAPPER_KEYS
    if not prefer and "ema" in obj and not (isinstance(obj["ema"], Mapping) and obj["ema"]):
        # else the raw weights would be converted in place of the EMA ones the default promises
        raise UserError(f"{source} has an empty 'ema' entry",
                        suggestion="pass --weights raw to convert its 'model' weights, if that is what you want")
    for key in keys:
        inner = obj.get(key)
        if isinstance(inner, Mapping) and inner and all(isinstance(v, Tensor) for v in inner.values()):
            return _without_wrapper_prefixes(inner)
    found = ", ".join(sorted(map(str, obj))[:8])
    raise UserError(f"{source} holds no state dict under {' / '.join(keys)} (top-level keys: {found})")


def _without_wrapper_prefixes(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``state`` without a ``module.`` (DDP) or ``_orig_mod.`` (torch.compile) prefix that every key carries."""
    state = dict(state)
    stripped = True
    while stripped:
        stripped = False
        for prefix in _KEY_PREFIXES:
            if all(str(k).startswith(prefix) for k in state):
                state = {str(k)[len(prefix):]: v for k, v in state.items()}
                stripped = True
    return state


def check_weights(state: Mapping[str, Tensor], source: str) -> None:
    """Refuse weights no model can use: NaN/inf, complex or integer tensors (loading would cast
    them silently, and a NaN weight samples black images)."""
    from zoo.weights import check_finite

    for key, value in state.items():
        if value.is_complex() or not value.is_floating_point():
            raise UserError(f"{source}: tensor {key} is {str(value.dtype).removeprefix('torch.')}; "
                            "the official weights are floating point", suggestion="check that this is the right file")
    check_finite(state, source, suggestion="convert a checkpoint saved before the run diverged (an earlier or the "
                                           "EMA copy)")


def default_model_inputs(inputs: Mapping[str, Any]) -> tuple:
    """``(x, t, y)`` from a golden file's ``inputs``."""
    return inputs["x"], inputs["t"], inputs.get("y")
