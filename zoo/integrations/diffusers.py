"""A zoo backbone as a diffusers model: ``to_diffusers(CKPT)`` drops into ``DiTPipeline``.

    from diffusers import DiTPipeline, DPMSolverMultistepScheduler
    from zoo.integrations.diffusers import to_diffusers, ZooTransformer2DModel
    transformer = to_diffusers("ckpt/dit_xl_2")           # or to_diffusers(model, recipe="dit_xl_2")
    transformer.save_pretrained("hf/dit_xl_2")           # config.json + diffusion_pytorch_model.safetensors
    transformer = ZooTransformer2DModel.from_pretrained("hf/dit_xl_2")
    pipe = DiTPipeline(transformer, vae, transformer.make_scheduler(DPMSolverMultistepScheduler))

The wrapper's config is JSON: the recipe's model section, the backbone's time input, the training
noise schedule, what ``DiTPipeline`` reads (``sample_size``, ``in_channels``, ``out_channels``;
learned σ when ``out_channels == 2 * in_channels``) and the plugin distributions its components come
from (named, with their versions, when a folder is loaded without them). ``forward(hidden_states, timestep,
class_labels)`` takes diffusers' integer DDPM timesteps k ∈ 0..N−1, whose noise level is
ᾱ_k, and gives the backbone what it was trained on for that level (DiT: k; DiMR: 8(k+1)/N − 4),
through the same time maps zoo's trainer and sampler use. DiMR's output is its last,
full-resolution prediction. ``DiTPipeline`` asks for the unconditional pass with label 1000;
a model whose null label is another number gets its own.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput
import torch
from torch import Tensor, nn

import zoo
from zoo.errors import UserError, some_of

PIPELINE_NULL_LABEL = 1000  # the label DiTPipeline passes for the unconditional half
EXPORT_RECORD, EXPORT_FORMAT = "zoo_export.json", "zoo-diffusers-export/1"  # written last: the export is complete
NAMED_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear"}  # zoo name -> diffusers beta_schedule
CONFIG_SOURCE = "<diffusers config>"  # where a mistake in the config is; from_pretrained names the file instead


class ZooTransformer2DModel(ModelMixin, ConfigMixin):
    """Any zoo backbone behind diffusers' transformer interface (``DiTPipeline``'s ``transformer``).

    Args:
        model: the recipe's ``model`` section (``{type: dit, ...}``); the backbone is built from it.
        time_input: the recipe's ``diffusion.time_input`` (how the backbone receives time).
        schedule: the recipe's ``diffusion.schedule`` (for :meth:`make_scheduler`).
        null_label: the backbone's unconditional label, −1 if it has none.
        class_conditional: whether the backbone takes class labels.
        sample_size, in_channels, out_channels: the backbone's input side and channels, its output channels.
        prediction: the recipe's ``diffusion.prediction``, what the output is: ``eps`` (ε) or ``v``
            (α·ε − σ·x₀); :meth:`make_scheduler` tells the scheduler (diffusers' ``v_prediction``).
        plugins: ``{distribution: version}`` of the plugins the model's components come from, named when
            they are missing here (``None`` in folders exported before it was recorded).
    """

    @register_to_config
    def __init__(self, model: dict, time_input: str, schedule: dict, null_label: int = -1,
                 class_conditional: bool = True, sample_size: int = 32, in_channels: int = 4, out_channels: int = 4,
                 prediction: str = "eps", plugins: dict | None = None):
        super().__init__()
        from zoo.diffusion.denoiser import Denoiser
        from zoo.diffusion.setup import num_steps, time_map

        self.backbone, sched = _build_parts(model, schedule, plugins)
        self._num_steps = num_steps(sched)
        null = null_label if null_label >= 0 else None
        self._denoiser = Denoiser(self.backbone, time_map({"diffusion": {"time_input": time_input}}, sched), null)

    def forward(self, hidden_states: Tensor, timestep: Tensor | int, class_labels: Tensor | None = None,
                return_dict: bool = True) -> Transformer2DModelOutput | tuple[Tensor]:
        """ε or v (``prediction``; with learned σ, [ε | σ channels]) for ``hidden_states`` at integer DDPM
        ``timestep`` (scalar or per sample).

        Step k has noise level ᾱ_k: zoo's continuous time (k + 1)/N, mapped to the backbone's input
        by the same :class:`~zoo.diffusion.denoiser.Denoiser` call as zoo's trainer and sampler.
        """
        from zoo.conditioning.base import as_time_vector
        from zoo.diffusion.time_input import index_to_time

        index = as_time_vector(timestep, hidden_states.shape[0], hidden_states.device)
        y = class_labels if self.config.class_conditional else None
        drop = None
        if y is not None and 0 <= self.config.null_label < PIPELINE_NULL_LABEL:  # fewer classes: 1000 means ours
            drop = y == PIPELINE_NULL_LABEL
        out = self._denoiser(hidden_states, index_to_time(index, self._num_steps), y, drop)
        out = out[-1] if isinstance(out, (list, tuple)) else out  # DiMR: per-branch, the full resolution last
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)

    def make_scheduler(self, scheduler_class: Any = None, **kwargs: Any) -> Any:
        """A diffusers scheduler (default ``DPMSolverMultistepScheduler``) on this model's training betas,
        told what the model predicts (``prediction_type``: a v model sampled as ε gives wrong images)."""
        if scheduler_class is None:
            from diffusers import DPMSolverMultistepScheduler as scheduler_class
        predicts = {"eps": "epsilon", "v": "v_prediction"}[self.config.prediction]
        return scheduler_class(**{**scheduler_kwargs(self.config.schedule), "prediction_type": predicts, **kwargs})

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> Any:
        """diffusers' ``from_pretrained``, strict: a missing or unexpected weight is an error, not a random init."""
        from zoo import atomic

        want_info = kwargs.pop("output_loading_info", False)
        # an export a kill interrupted between its renames is only hf.old-*/hf.tmp-*: put it back first
        atomic.repair(Path(pretrained_model_name_or_path, kwargs.get("subfolder") or ""), EXPORT_RECORD)
        try:
            model, info = super().from_pretrained(pretrained_model_name_or_path, output_loading_info=True, **kwargs)
        except UserError as err:
            if err.file == CONFIG_SOURCE:  # the mistake is in this folder's config.json
                err.file = os.path.join(pretrained_model_name_or_path, kwargs.get("subfolder") or "", "config.json")
            raise
        problems = [f"{key.replace('_', ' ')}: {', '.join(map(str, info[key][:10]))}"
                    for key in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(key)]
        if problems:
            raise UserError(f"{pretrained_model_name_or_path} does not match its config: " + "; ".join(problems))
        return (model, info) if want_info else model


def _build_parts(model: dict, schedule: dict, plugins: dict | None) -> tuple[nn.Module, Any]:
    """The backbone and the schedule a config describes; an unknown name says which recorded plugin
    (and version) the folder was exported with, as a zoo checkpoint's does."""
    from zoo.checkpoint import add_plugin_hint
    from zoo.recipe import Recipe

    try:
        backbone = zoo.build_model(Recipe({"model": model}, source=CONFIG_SOURCE))
        return backbone, zoo.build_component("schedule", dict(schedule))
    except UserError as err:
        add_plugin_hint(err, plugins)
        raise


def scheduler_kwargs(schedule: Mapping[str, Any]) -> dict[str, Any]:
    """Constructor arguments of a diffusers scheduler with the betas of zoo schedule ``schedule``."""
    built = zoo.build_component("schedule", dict(schedule))
    betas = getattr(built, "betas", None)
    if betas is None:
        raise UserError(f"schedule {schedule.get('type')!r} is continuous-time; diffusers' schedulers need "
                        "discrete DDPM betas", suggestion="use a linear or scaled_linear schedule")
    out: dict[str, Any] = {"num_train_timesteps": int(built.num_steps)}
    if schedule.get("type") in NAMED_SCHEDULES:
        out.update(beta_schedule=NAMED_SCHEDULES[schedule["type"]],
                   beta_start=built.beta_start, beta_end=built.beta_end)
    else:
        out["trained_betas"] = betas.tolist()
    return out


def diffusers_config(model: nn.Module, recipe: Mapping[str, Any]) -> dict[str, Any]:
    """The wrapper's config for ``model`` built from ``recipe`` (JSON data only)."""
    from zoo.diffusion.setup import DEFAULT_SCHEDULE
    from zoo.meta import NotOnMeta, build_on_meta, example_inputs, meta_forward
    from zoo.registry import plugins_named
    from zoo.sample import num_classes

    diffusion = recipe.get("diffusion") or {}
    if diffusion.get("time_input") is None:
        raise UserError("the recipe does not say how the backbone receives time", key_path="diffusion.time_input")
    meta = build_on_meta(lambda: zoo.build_model({"model": recipe["model"]}))
    x, t, y = example_inputs(meta)  # one message for a backbone without the method
    try:
        with torch.no_grad():
            out = meta_forward(meta, x, t, y)
    except NotOnMeta:  # a backbone whose forward needs real values (.item()): asked once on the cpu instead
        real = zoo.build_model({"model": recipe["model"]})
        x, t, y = example_inputs(real)
        with torch.no_grad():
            out = real(x, t, y)
    out = out[-1] if isinstance(out, (list, tuple)) else out
    if x.ndim != 4 or x.shape[2] != x.shape[3]:
        raise UserError(f"diffusers' pipelines need square (B, C, H, H) inputs; this model takes {tuple(x.shape)}")
    null = diffusion.get("null_label")
    config = {
        "model": recipe["model"],
        "time_input": diffusion["time_input"],
        "schedule": diffusion.get("schedule") or DEFAULT_SCHEDULE,
        "null_label": -1 if null is None else int(null),
        "class_conditional": num_classes(recipe) is not None,
        "sample_size": int(x.shape[-1]),
        "in_channels": int(x.shape[1]),
        "out_channels": int(out.shape[1]),
        "prediction": str(diffusion.get("prediction", "eps")),
    }
    config["plugins"] = plugins_named({"model": config["model"], "schedule": config["schedule"]})
    json.dumps(config)  # a recipe is YAML data; anything else is a bug to see here, not in save_pretrained
    return config


def to_diffusers(source: nn.Module | str | Path, recipe: str | Path | dict | None = None,
                 use_ema: bool = True) -> ZooTransformer2DModel:
    """A :class:`ZooTransformer2DModel` holding ``source``'s weights.

    ``source`` is a zoo checkpoint directory (its recipe is in it; EMA weights if ``use_ema`` and
    saved), or a model built by zoo together with its ``recipe``.
    """
    if isinstance(source, nn.Module):
        if recipe is None:
            raise UserError("to_diffusers(model) needs the model's recipe",
                            suggestion="to_diffusers(model, recipe=...)")
        model, full = source, zoo.load_recipe(recipe)
    else:
        from zoo.integrations.checkpoints import load_preferred

        model, full, _ = load_preferred(source, use_ema)
    wrapper = ZooTransformer2DModel.from_config(diffusers_config(model, full))
    from zoo.weights import load_state_dict_strict

    try:
        load_state_dict_strict(wrapper.backbone, model.state_dict(), "the model given to to_diffusers")
    except UserError as err:
        if recipe is None:
            raise
        err.message = err.message.replace("does not match the model", "does not match the model its recipe builds")
        err.args, err.suggestion = (err.message,), ("pass the recipe it was built from, with its overrides: "
                                                    "recipe=zoo.load_recipe(NAME, [\"model.KEY=VALUE\", ...])")
        raise
    dtype = next(model.parameters()).dtype
    return (wrapper if dtype == wrapper.dtype else wrapper.to(dtype=dtype)).eval()


def export(checkpoint: str | Path, out: str | Path, use_ema: bool = True, force: bool = False) -> Path:
    """Write checkpoint ``checkpoint`` as a diffusers model directory ``out`` (crash-safe, :mod:`zoo.atomic`).

    ``out`` holds ``config.json`` and ``diffusion_pytorch_model.safetensors`` as ``save_pretrained``
    writes them, and ``zoo_export.json``, which lists them and marks the directory as zoo's. ``out``
    must be new or an empty directory; with ``force`` it may also be a previous export, which is
    replaced. Nothing else is ever replaced.
    """
    from zoo import atomic

    def replace(target: Path) -> None:
        if target.is_dir() and not any(target.iterdir()):
            return
        if not atomic.is_sealed(target, EXPORT_RECORD):
            raise UserError(f"{target} exists and is not a zoo diffusers export; it is left alone",
                            suggestion="choose another --out")
        added = atomic.unlisted_files(target, EXPORT_RECORD)
        if added:  # replacing the directory would delete them
            raise UserError(f"{target} is a zoo diffusers export that also holds files zoo did not write "
                            f"({some_of(added)}); it is left alone", suggestion="move them away or choose another --out")
        if not force:
            raise UserError(f"{target} already holds an export", suggestion="pass --force to replace it")

    out = Path(out)
    atomic.repair(out, EXPORT_RECORD)  # a killed export's copies (DIR.tmp-*, DIR.old-*) go even if this one is refused
    if out.exists():
        replace(out)  # refuse before the model is loaded
    from zoo.integrations.checkpoints import load_preferred

    model, recipe, weights = load_preferred(checkpoint, use_ema)
    wrapper = to_diffusers(model, recipe)
    payload = {"format": EXPORT_FORMAT, "checkpoint": str(checkpoint), "weights": weights}
    return atomic.write_dir(out, wrapper.save_pretrained, EXPORT_RECORD, payload, replace=replace)
