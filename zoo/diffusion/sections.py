"""Validators of the recipe's ``diffusion`` and ``sample`` sections (run before anything is built).

    diffusion:
      schedule: {type: linear, num_steps: 1000, beta_start: 1.0e-4, beta_end: 0.02}   # a `schedule`
      objective: {type: eps_mse | hybrid_vlb | multiscale, coeffs: [...], vlb_weight: 1.0}
      time_input: dit_index | uvit_discrete | uvit_continuous | dimr_log_snr
      label_drop: 0.1         # P(label → null label) in training
      null_label: 1000        # the unconditional label (also used by guidance)
    sample:
      solver: {type: dpm_solver++, steps: 25, ...}                                        # a `solver`
      cfg: {scale: 1.5, convention: dit | uvit, channels: 3, power: 1.0}
      num_samples: 50000
      batch_size: 32
      seed: 0

A model that drops labels itself (DiT's ``class_dropout_prob``) must state the same rate as
``diffusion.label_drop``; the objective then leaves the dropping to the model.
Importing this module does not import torch.
"""

from __future__ import annotations

from numbers import Real
from typing import Any

from zoo.errors import did_you_mean
from zoo.recipe import Recipe
from zoo.validate import SECTION_VALIDATORS, resolve_component

TIME_INPUT_NAMES = ("dit_index", "uvit_discrete", "uvit_continuous", "dimr_log_snr")
OBJECTIVE_KEYS = {"eps_mse": (), "hybrid_vlb": ("vlb_weight",), "multiscale": ("coeffs",)}
DIFFUSION_KEYS = ("schedule", "objective", "time_input", "label_drop", "null_label")
SAMPLE_KEYS = ("solver", "cfg", "num_samples", "batch_size", "seed")
CFG_KEYS = ("scale", "convention", "channels", "power")
CONVENTIONS = ("dit", "uvit")


def _number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_keys(recipe: Recipe, value: dict, allowed: tuple, path: tuple, what: str) -> None:
    for key in value:
        if key not in allowed:
            raise recipe.error(path + (key,), f"unknown key {key!r} in {what}; its keys are {', '.join(allowed)}",
                               suggestion=did_you_mean(key, allowed))


def _check_choice(recipe: Recipe, value: Any, choices: tuple, path: tuple, what: str) -> None:
    if value not in choices:
        raise recipe.error(path, f"unknown {what} {value!r}; choose one of {', '.join(choices)}",
                           suggestion=did_you_mean(str(value), choices))


def objective_spec(value: Any) -> dict:
    """An objective entry as ``{type: NAME, ...}`` (a bare name is allowed)."""
    return {"type": value} if isinstance(value, str) else dict(value or {"type": "eps_mse"})


def validate_diffusion(value: dict | None, recipe: Recipe) -> None:
    value, path = value or {}, ("diffusion",)
    _check_keys(recipe, value, DIFFUSION_KEYS, path, "diffusion")
    if "schedule" in value:
        resolve_component(recipe, "schedule", value["schedule"], path + ("schedule",), supplied=())
    if "objective" in value:
        spec, opath = value["objective"], path + ("objective",)
        if not isinstance(spec, (str, dict)):
            raise recipe.error(opath, f"expected an objective name or {{type: NAME, ...}}, got {spec!r}")
        spec = objective_spec(spec)
        _check_choice(recipe, spec.get("type"), tuple(OBJECTIVE_KEYS), opath + ("type",), "objective")
        options = OBJECTIVE_KEYS[spec["type"]]
        _check_keys(recipe, spec, ("type",) + options, opath, f"objective {spec['type']!r}")
        if spec["type"] == "multiscale":
            coeffs = spec.get("coeffs")
            if not isinstance(coeffs, list) or not coeffs or not all(_number(c) for c in coeffs):
                raise recipe.error(opath + ("coeffs",), "the multiscale objective needs coeffs: a list of numbers, "
                                   "one per branch, lowest resolution first", suggestion="e.g. coeffs: [0.25, 1.0]")
        if "vlb_weight" in spec and not _number(spec["vlb_weight"]):
            raise recipe.error(opath + ("vlb_weight",), f"expected a number, got {spec['vlb_weight']!r}")
    if "time_input" in value:
        _check_choice(recipe, value["time_input"], TIME_INPUT_NAMES, path + ("time_input",), "time_input")
    drop = value.get("label_drop", 0.0)
    if not _number(drop) or not 0.0 <= drop <= 1.0:
        raise recipe.error(path + ("label_drop",), f"label_drop must be a probability in [0, 1], got {drop!r}")
    null = value.get("null_label")
    if null is not None and not _int(null):
        raise recipe.error(path + ("null_label",), f"null_label must be an integer, got {null!r}")
    if drop > 0 and null is None:
        raise recipe.error(path + ("label_drop",), "label_drop > 0 needs the null label",
                           suggestion="add diffusion.null_label: NUM_CLASSES")
    model = recipe.data.get("model")
    inside = model.get("class_dropout_prob") if isinstance(model, dict) else None
    if _number(inside) and inside > 0 and inside != drop:
        raise recipe.error(path + ("label_drop",), f"the model drops labels itself with class_dropout_prob={inside} "
                           f"but diffusion.label_drop is {drop}; they must agree (the objective then leaves the "
                           "dropping to the model)", suggestion=f"set label_drop: {inside}")


def validate_sample(value: dict | None, recipe: Recipe) -> None:
    value, path = value or {}, ("sample",)
    _check_keys(recipe, value, SAMPLE_KEYS, path, "sample")
    if "solver" in value:
        resolve_component(recipe, "solver", value["solver"], path + ("solver",), supplied=())
    for key in ("num_samples", "batch_size"):
        if key in value and (not _int(value[key]) or value[key] < 1):
            raise recipe.error(path + (key,), f"{key} must be a positive integer, got {value[key]!r}")
    if "seed" in value and not _int(value["seed"]):
        raise recipe.error(path + ("seed",), f"seed must be an integer, got {value['seed']!r}")
    cfg = value.get("cfg")
    if cfg is None:
        return
    cpath = path + ("cfg",)
    if not isinstance(cfg, dict):
        raise recipe.error(cpath, f"cfg must be a mapping {{scale: ..., convention: dit|uvit}}, got {cfg!r}")
    _check_keys(recipe, cfg, CFG_KEYS, cpath, "sample.cfg")
    if "scale" in cfg and cfg["scale"] is not None and not _number(cfg["scale"]):
        raise recipe.error(cpath + ("scale",), f"scale must be a number, got {cfg['scale']!r}")
    if "convention" in cfg:
        _check_choice(recipe, cfg["convention"], CONVENTIONS, cpath + ("convention",), "guidance convention")
    channels = cfg.get("channels")
    if channels is not None and (not _int(channels) or channels < 1):
        raise recipe.error(cpath + ("channels",), f"channels must be a positive integer or null, got {channels!r}")
    power = cfg.get("power")
    if power is not None and (not _number(power) or power <= 0):
        raise recipe.error(cpath + ("power",), f"power must be a positive number or null, got {power!r}")


SECTION_VALIDATORS["diffusion"] = validate_diffusion
SECTION_VALIDATORS["sample"] = validate_sample
