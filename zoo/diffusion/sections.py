"""Validators of the recipe's ``diffusion`` and ``sample`` sections (run before anything is built).

    diffusion:
      schedule: {type: linear, num_steps: 1000, beta_start: 1.0e-4, beta_end: 0.02}   # a `schedule`
      objective: {type: eps_mse | hybrid_vlb | multiscale, coeffs: [...], vlb_weight: 1.0, decoder_cdf: tanh}
      prediction: eps | v     # what the model outputs: ε (default, the papers') or v = α·ε − σ·x_0
      time_input: dit_index | uvit_discrete | uvit_continuous | dimr_log_snr
      min_snr_gamma: 5.0      # Min-SNR-γ loss weighting (Hang et al. 2023); null/absent = unweighted
      time_sampling: uniform | {type: logit_normal, mean: 0.0, std: 1.0}   # training times (SD3's logit-normal)
      label_drop: 0.1         # P(label → null label) in training
      null_label: 1000        # the unconditional label (also used by guidance)
    sample:
      solver: {type: dpm_solver++, steps: 25, ...}                                        # a `solver`
      cfg: {scale: 1.5, convention: dit | uvit, channels: 3, power: 1.0}
      num_samples: 50000
      batch_size: 32
      seed: 0
      labels: random | balanced   # classes where none are given: seeded random (default) or i % num_classes

A model that drops labels itself (DiT's ``class_dropout_prob``) must state the same rate as
``diffusion.label_drop``; zoo train then draws the drops itself, per sample, with the model's own
dropout off (labels are not dropped twice).
Importing this module does not import torch.
"""

from __future__ import annotations

from typing import Annotated, Any

from zoo.domains import (MAX_BATCH, MAX_COUNT, MAX_WIDTH, Doc, NonEmpty, NonNegative, OneOf, Positive, Probability,
                         Range, Required)
from zoo.diffusion.gaussian import DECODER_CDFS
from zoo.precision import PRECISIONS
from zoo.recipe import Recipe
from zoo.validate import Component, check_table, domain_error, register_section

PREDICTION_NAMES = ("eps", "v")
TIME_INPUT_NAMES = ("dit_index", "uvit_discrete", "uvit_continuous", "dimr_log_snr")
CONVENTIONS = ("dit", "uvit")
LABEL_DRAWS = ("random", "balanced")  # zoo.seeds.sample_labels

#: Each objective's keys (``type`` included); a new objective is one entry.
OBJECTIVES: dict[str, dict[str, Any]] = {
    "eps_mse": {"type": str},
    "hybrid_vlb": {"type": str, "vlb_weight": Annotated[float, NonNegative],
                   "decoder_cdf": Annotated[str, OneOf(DECODER_CDFS, "decoder CDF"),
                                            Doc("tanh: DiT's approximation with its 1e-12 floor (default); exact")]},
    "multiscale": {"type": str, "coeffs": Annotated[list[Annotated[float, NonNegative]], NonEmpty, Required,
                                                    Doc("one per branch, lowest resolution first")]},
}
Objective = Annotated[str, OneOf(OBJECTIVES, "objective")]

#: Each training-time sampling's keys (``type`` included); mirrors zoo.diffusion.time_sampling.
TIME_SAMPLINGS: dict[str, dict[str, Any]] = {
    "uniform": {"type": str},
    "logit_normal": {"type": str, "mean": Annotated[float, Range(-10, 10), Doc("location of the logit")],
                     "std": Annotated[float, Positive, Doc("spread of the logit")]},
}
TimeSamplingName = Annotated[str, OneOf(TIME_SAMPLINGS, "time sampling")]

#: What an absent key of the ``diffusion`` section means (``schedule``: DDPM's linear betas).
DIFFUSION_DEFAULTS: dict[str, Any] = {
    "schedule": {"type": "linear", "num_steps": 1000, "beta_start": 1e-4, "beta_end": 0.02},
    "objective": "eps_mse", "prediction": "eps", "min_snr_gamma": None, "time_sampling": "uniform",
    "label_drop": 0.0, "null_label": None,
}

#: The ``diffusion`` section (``objective`` is a name or a mapping checked against OBJECTIVES).
DIFFUSION: dict[str, Any] = {
    "schedule": Component("schedule"),
    "objective": Any,
    "time_input": Annotated[str, OneOf(TIME_INPUT_NAMES, "time_input")],
    "prediction": Annotated[str, OneOf(PREDICTION_NAMES, "prediction"),
                            Doc("model output: eps (default) or v = alpha*eps - sigma*x0")],
    # Below ~1e-3 the weights min(SNR, gamma) / (SNR + 1) fall towards float32's underflow and the loss to 0.
    "min_snr_gamma": Annotated[float, Range(1e-3, None), Doc("Min-SNR-gamma loss weight cap; null = unweighted")] | None,
    "time_sampling": Any,
    "label_drop": Annotated[float, Probability, Doc("P(label -> null label) in training")],
    "null_label": Annotated[int, NonNegative] | None,
}

#: The guidance scales a recipe's ``sample.cfg.scale`` or a ``--cfg`` may give.
GUIDANCE_SCALE = Range(0, 1000)

#: The ``sample`` section.
SAMPLE: dict[str, Any] = {
    "solver": Component("solver"),
    "cfg": {
        "scale": Annotated[float, GUIDANCE_SCALE] | None,
        "convention": Annotated[str, OneOf(CONVENTIONS, "guidance convention")],
        "channels": Annotated[int, Range(1, MAX_WIDTH), Doc("guided channels; null = all")] | None,
        "power": Annotated[float, Positive] | None,
    },
    "num_samples": Annotated[int, Range(1, MAX_COUNT)],
    "batch_size": Annotated[int, Range(1, MAX_BATCH)],
    "seed": Annotated[int, Range(0, 2**56 - 1)],  # per-sample seeds keep 56 bits: a larger one repeats a smaller one
    "labels": Annotated[str, OneOf(LABEL_DRAWS, "label draw"),
                        Doc("classes where none are given: random (seeded; default) or balanced (sample i: class i % K)")],
    "precision": Annotated[str, OneOf(PRECISIONS, "precision"),
                           Doc("model calls while sampling: fp32, tf32 (CUDA), bf16 or fp16 autocast; unset: PyTorch's defaults")],
}


#: What a recipe's ``sample`` section means by the keys it leaves out (``zoo build --print-recipe`` says them).
SAMPLE_UNSET_MEANS: dict[str, Any] = {"labels": "random", "seed": 0}


def objective_spec(value: Any) -> dict:
    """An objective entry as ``{type: NAME, ...}`` (a bare name is allowed)."""
    return {"type": value} if isinstance(value, str) else dict(value or {"type": "eps_mse"})


def with_defaults(key: str, value: Any) -> Any:
    """``diffusion.objective`` or ``diffusion.time_sampling`` (``key``) as ``{type: NAME, ...}`` with every key
    it leaves out at its default: ``logit_normal`` and ``{type: logit_normal, mean: 0.0, std: 1.0}`` train
    alike, so a resume or zoo compare must read them alike. Anything else is returned as it is."""
    if value is None:
        value = DIFFUSION_DEFAULTS[key]
    spec = {"type": value} if isinstance(value, str) else value
    if not isinstance(spec, dict) or not isinstance(spec.get("type"), str):
        return value
    if key == "time_sampling":
        from zoo.diffusion.time_sampling import TIME_SAMPLINGS as DEFAULTS_OF
        defaults = DEFAULTS_OF.get(spec["type"], {})
    elif key == "objective" and spec["type"] in OBJECTIVES:
        import inspect

        from zoo.diffusion.objectives import OBJECTIVES as CLASSES
        params = inspect.signature(CLASSES[spec["type"]].__init__).parameters
        defaults = {k: params[k].default for k in OBJECTIVES[spec["type"]]
                    if k in params and params[k].default is not inspect.Parameter.empty}
    else:
        return value
    return {"type": spec["type"], **defaults, **spec}


def with_component_defaults(diffusion: dict) -> dict:
    """A ``diffusion`` section whose ``objective`` and ``time_sampling`` (where given) have their defaults
    filled in (:func:`with_defaults`)."""
    filled = {key: with_defaults(key, diffusion[key]) for key in ("objective", "time_sampling") if key in diffusion}
    return {**diffusion, **filled}


def _check_multiscale(spec: dict, recipe: Recipe, path: tuple) -> None:
    """A multi-scale loss needs a model with one output per branch, and one coefficient for each."""
    model = recipe.data.get("model")
    model = model if isinstance(model, dict) else {}
    branches = model.get("branches")
    if model.get("type") in ("dit", "uvit"):  # one output; a plugin backbone may well return one per branch
        raise recipe.error(path + ("type",), f"the multiscale objective needs a multi-branch model (DiMR), not "
                           f"{model['type']}", suggestion="use objective eps_mse for this model")
    coeffs = spec.get("coeffs")
    if isinstance(coeffs, list) and isinstance(branches, list) and len(coeffs) != len(branches):
        n = len(branches)
        raise recipe.error(path + ("coeffs",), f"{len(coeffs)} coefficient{'s' * (len(coeffs) != 1)} for "
                           f"{n} branch{'es' * (n != 1)}",
                           suggestion=f"give {n} coefficient{'s' * (n != 1)}, one per branch, lowest resolution first")
    if isinstance(coeffs, list) and coeffs and not any(coeffs):
        raise recipe.error(path + ("coeffs",), "every coefficient is 0: the loss would be 0 and nothing would train",
                           suggestion="DiMR's own: [0.25, 1.0] for two branches (lowest resolution first)")


def _check_named_table(recipe: Recipe, value: Any, table: dict[str, dict], name_type: Any, path: tuple,
                       what: str, default: str) -> dict:
    """A ``NAME`` or ``{type: NAME, ...}`` entry checked against ``table[NAME]``; returns it as a mapping
    (an empty mapping is ``default``)."""
    if not isinstance(value, (str, dict)):
        raise recipe.error(path, f"expected {what} name or {{type: NAME, ...}}, got {value!r}")
    spec = {"type": value} if isinstance(value, str) else dict(value or {"type": default})
    tpath = path + ("type",) if isinstance(value, dict) else path
    if "type" not in spec:  # {tpye: eps_mse}: the typo is the mistake, not the type it left out
        known = {"type": Any, **{key: Any for keys in table.values() for key in keys}}  # names only: values below
        check_table(recipe, spec, known, path, what.split(" ", 1)[1])
    if not isinstance(spec.get("type"), str) or spec["type"] not in table:  # a list: unhashable, not a name
        raise domain_error(recipe, tpath, spec.get("type"), name_type)
    check_table(recipe, spec, table[spec["type"]], path, f"{what.split(' ', 1)[1]} {spec['type']!r}")
    return spec


def learns_sigma(model: Any) -> bool:
    """Whether the model section outputs a learned variance: its ``learn_sigma``, else its backbone's default."""
    if not isinstance(model, dict):
        return False
    if "learn_sigma" in model:
        return model["learn_sigma"] is True
    from zoo.introspect import backbone_defaults

    return backbone_defaults(model).get("learn_sigma") is True  # a _target_ model: its own forward decides


def validate_diffusion(value: dict | None, recipe: Recipe) -> None:
    value, path = value or {}, ("diffusion",)
    check_table(recipe, value, DIFFUSION, path, "diffusion")
    if value.get("time_sampling") is not None:
        _check_named_table(recipe, value["time_sampling"], TIME_SAMPLINGS, TimeSamplingName,
                           path + ("time_sampling",), "a time sampling",
                           "uniform")
    if "objective" in value:
        opath = path + ("objective",)
        spec = _check_named_table(recipe, value["objective"], OBJECTIVES, Objective, opath, "an objective", "eps_mse")
        if spec["type"] == "multiscale":
            _check_multiscale(spec, recipe, opath)
        if spec["type"] == "hybrid_vlb" and value.get("prediction", "eps") != "eps":
            raise recipe.error(path + ("prediction",), "the hybrid_vlb objective (learned sigma) is defined for "
                               "eps prediction only", suggestion="remove diffusion.prediction or use objective eps_mse")
    if value.get("prediction", "eps") != "eps" and learns_sigma(recipe.data.get("model")):
        raise recipe.error(path + ("prediction",), "a learned-sigma model ([eps | v] output, model.learn_sigma) "
                           "trains with the hybrid_vlb objective, which is defined for eps prediction only",
                           suggestion="remove diffusion.prediction, or set model.learn_sigma: false")
    drop = value.get("label_drop", 0.0)
    if drop > 0 and value.get("null_label") is None:
        raise recipe.error(path + ("label_drop",), "label_drop > 0 needs the null label",
                           suggestion="add diffusion.null_label: NUM_CLASSES")
    model = recipe.data.get("model")
    inside = model.get("class_dropout_prob") if isinstance(model, dict) else None
    if isinstance(inside, (int, float)) and inside > 0 and inside != drop:
        raise recipe.error(path + ("label_drop",), f"the model drops labels itself with class_dropout_prob={inside} "
                           f"but diffusion.label_drop is {drop}; they must agree (zoo train draws the drops "
                           "itself, with the model's own dropout off)", suggestion=f"set label_drop: {inside}")


register_section("diffusion", DIFFUSION, validate_diffusion)
register_section("sample", SAMPLE)
