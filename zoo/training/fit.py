"""Does the rest of a recipe fit the model it builds? The checks that need the model itself.

Section validators check each section on its own; whether ``diffusion.null_label`` has an
embedding row, the objective can score the model's output, guidance names channels the model
has, or the data has the model's image size, can only be asked of a built model. ``zoo train``
asks before its first step and ``zoo build`` asks the same of its meta-device model, so a recipe
that builds is one that trains (data files aside: they are read by ``zoo train`` only).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from zoo.diffusion.objectives import DiffusionObjective
from zoo.diffusion.setup import (build_objective, check_guidance_channels, check_label_rows, check_null_label,
                                 check_time_input, guidance_settings, model_drops_labels,
                                 time_input_name)
from zoo.errors import UserError
from zoo.meta import MetaShapeCache, RepeatedBlockMemo, example_inputs, without_dynamo
from zoo.sample import check_sample_section, num_classes


def training_objective(recipe: Mapping[str, Any], meta_model: nn.Module) -> DiffusionObjective:
    """The objective ``zoo train`` optimises, checked against ``meta_model`` (any device).

    A DiT that drops labels itself (``class_dropout_prob``) has the trainer drop them instead, at
    its rate and to its null label (``num_classes``) unless ``diffusion.null_label`` names one.
    """
    objective = build_objective(recipe)
    check_time_input(recipe, meta_model)
    if model_drops_labels(recipe):
        model_cfg = recipe["model"]
        objective.label_drop = float(model_cfg["class_dropout_prob"])
        if objective.null_label is None:
            objective.null_label = int(model_cfg["num_classes"])
    data_classes = (recipe.get("data") or {}).get("num_classes")
    if objective.label_drop > 0:
        check_null_label(meta_model, objective.null_label, recipe.get("data"))
    check_label_rows(meta_model, num_classes(recipe), from_data=bool(data_classes))
    _check_output(meta_model, objective)
    return objective


def check_recipe_fits_model(recipe: Mapping[str, Any], meta_model: nn.Module) -> None:
    """Every check of ``zoo train`` and ``zoo sample`` against the model that reads no file: the
    objective and null label, the sampler's learned variance, the guidance channels and the data
    section's image size."""
    from zoo.training.data import check_data_section

    if not (recipe.get("diffusion") or {}).get("time_input"):  # a model recipe alone (a plugin's, a _target_
        if recipe.get("sample") or recipe.get("data"):  # module): nothing to fit; one that says how it samples or
            time_input_name(recipe)  # what it trains on is checked as zoo sample and train check it: refused here
        return
    training_objective(recipe, meta_model)
    check_sample_section(recipe)  # a respacing the schedule cannot take, a learned variance, guidance's null label
    example = getattr(meta_model, "example_inputs", None)
    if example is None:
        return
    shape = tuple(example(1)[0].shape[1:])
    guidance = guidance_settings(recipe)
    try:
        check_guidance_channels(guidance, shape[0])
    except UserError as err:
        raise err.locate(key_path="sample.cfg.channels") from None
    if guidance.active and num_classes(recipe):  # zoo sample's guided default needs the null label's row
        check_null_label(meta_model, (recipe.get("diffusion") or {}).get("null_label"), recipe.get("data"),
                         guidance)
    check_data_section(recipe.get("data") or {}, shape, num_classes(recipe))


def _check_output(meta_model: nn.Module, objective: DiffusionObjective) -> None:
    """The objective can score what the model returns (one output or one per branch, learned σ or
    not): asked once on the meta device, before the run directory fills, not at step 1."""
    def forward() -> Any:  # on meta: each op's shape once per input shape, each repeated block once (the
        # XL recipes' 30-40 identical blocks per branch), and no Dynamo import (seconds)
        if not x.is_meta:
            with torch.no_grad():
                return meta_model(x, t, y)
        with torch.no_grad(), MetaShapeCache(), RepeatedBlockMemo(meta_model):
            return meta_model(x, t, y)

    try:
        x, t, y = example_inputs(meta_model)
        out = without_dynamo(forward)
    except Exception:  # noqa: BLE001 - a plugin backbone that cannot run on meta: its first step checks instead
        return
    try:
        objective.check_output(out, tuple(x.shape))
    except ValueError as err:
        raise UserError(str(err), key_path="diffusion.objective") from None
