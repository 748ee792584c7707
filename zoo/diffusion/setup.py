"""Build the diffusion pieces a recipe describes: schedule, time map, objective, guided ``eps_fn``.

The trainer and the sampler both go through these functions, so they cannot disagree on the
schedule, the backbone's time input or the null label.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch
from torch import Tensor, nn

from zoo.errors import UserError, one_of

from .guidance import GuidedModel, to_dit_scale
from .objectives import OBJECTIVES, DiffusionObjective
from .sections import DIFFUSION_DEFAULTS, GUIDANCE_SCALE, objective_spec
from .time_input import get_time_input
from .time_sampling import TimeSampling

if TYPE_CHECKING:
    from zoo.solvers.schedules import NoiseSchedule

DEFAULT_SCHEDULE = DIFFUSION_DEFAULTS["schedule"]


def _diffusion(recipe: Mapping[str, Any]) -> Mapping[str, Any]:
    return recipe.get("diffusion") or {}


def build_schedule(recipe: Mapping[str, Any]) -> "NoiseSchedule":
    """The recipe's ``diffusion.schedule`` (DDPM's linear betas if it names none)."""
    import zoo

    return zoo.build_component("schedule", _diffusion(recipe).get("schedule") or DEFAULT_SCHEDULE)


def num_steps(schedule: "NoiseSchedule") -> int:
    """N of a discrete schedule; 1000 for continuous ones (the maps that need N assume it)."""
    return int(getattr(schedule, "num_steps", 1000))


def time_map(recipe: Mapping[str, Any], schedule: "NoiseSchedule") -> Callable[[Tensor], Tensor]:
    """Continuous solver time t → the backbone's time input, as ``diffusion.time_input`` names it."""
    return _TimeMap(get_time_input(time_input_name(recipe)), num_steps(schedule))


def time_input_name(recipe: Mapping[str, Any]) -> str:
    """``diffusion.time_input``; a recipe that gives none is refused by name (training and sampling need it)."""
    name = _diffusion(recipe).get("time_input")
    if name is None:
        raise UserError("the recipe does not say how the backbone receives time",
                        key_path="diffusion.time_input",
                        suggestion="add diffusion.time_input: dit_index, uvit_discrete, uvit_continuous or dimr_log_snr")
    return name


@dataclass(frozen=True)
class _TimeMap:
    """``fn(t, num_steps)`` with ``num_steps`` fixed: picklable, unlike a lambda (a pickled diffusers wrapper)."""

    fn: Callable[[Tensor, int], Tensor]
    num_steps: int

    def __call__(self, t: Tensor) -> Tensor:
        return self.fn(t, self.num_steps)


def check_time_input(recipe: Mapping[str, Any], model: nn.Module) -> None:
    """Refuse a ``diffusion.time_input`` on another scale than the backbone's time handling was built for
    (its ``time_inputs``; a model that lists none is not checked): DiMR's time-dependent norms read τ =
    input/4 and its adaLN-Zero the DDPM step back from a log-SNR, so a DDPM index of 0..999 saturated them,
    and U-ViT's and DiT's norms scale a step by 1/500, which turned a log-SNR into almost no time at all."""
    accepted = getattr(model, "time_inputs", None)
    name = time_input_name(recipe)
    if accepted and name not in accepted:
        raise UserError(f"diffusion.time_input {name} feeds {type(model).__name__} a time on another scale than "
                        f"it reads (it takes {one_of(accepted)})", key_path="diffusion.time_input",
                        suggestion=f"train with one it reads (--set diffusion.time_input={accepted[0]}"
                        f"{', ...' * (len(accepted) > 1)}); weights trained under {name} (zoo before 2026-12-07 "
                        "accepted it) mean something only under it: sample them with that version")


def prediction(recipe: Mapping[str, Any]) -> str:
    """What the backbone outputs, ``diffusion.prediction``: ``eps`` (default) or ``v``."""
    return _diffusion(recipe).get("prediction", DIFFUSION_DEFAULTS["prediction"])


def model_drops_labels(recipe: Mapping[str, Any]) -> bool:
    """True when the backbone drops labels itself in training (DiT's ``class_dropout_prob``)."""
    model = recipe.get("model")
    return isinstance(model, Mapping) and (model.get("class_dropout_prob") or 0) > 0


def build_objective(recipe: Mapping[str, Any], schedule: "NoiseSchedule | None" = None) -> DiffusionObjective:
    """The training objective of ``diffusion.objective`` (ε-MSE if none is named)."""
    diffusion = _diffusion(recipe)
    schedule = schedule if schedule is not None else build_schedule(recipe)
    spec = objective_spec(diffusion.get("objective"))
    options = {k: v for k, v in spec.items() if k != "type"}
    label_drop = 0.0 if model_drops_labels(recipe) else float(diffusion.get("label_drop", 0.0))
    time_map(recipe, schedule)  # a missing time_input is a UserError, not a default
    try:
        return OBJECTIVES[spec["type"]](
            schedule,
            time_input=diffusion["time_input"],
            label_drop=label_drop,
            null_label=diffusion.get("null_label"),
            prediction=prediction(recipe),
            min_snr_gamma=diffusion.get("min_snr_gamma"),
            time_sampling=TimeSampling.from_spec(diffusion.get("time_sampling")),
            **options,
        )
    except ValueError as err:  # a time input, schedule and objective that do not fit together
        raise UserError(str(err), key_path="diffusion") from None


@dataclass(frozen=True)
class GuidanceSettings:
    """Classifier-free guidance as the recipe's ``sample.cfg`` states it (scale in ``convention``)."""

    scale: float | None = None
    convention: str = "dit"
    channels: int | None = None
    power: float | None = None

    @property
    def w(self) -> float | None:
        """The DiT-style weight (1 = no guidance)."""
        return None if self.scale is None else to_dit_scale(self.scale, self.convention)

    @property
    def active(self) -> bool:
        """Whether guidance changes anything (a scale that is not the convention's 'off')."""
        return self.scale is not None and self.w != 1.0  # w = 1: 1 + (w - 1)·decay is 1 under DiMR's power too

    def describe(self) -> str:
        if not self.active:
            return "no classifier-free guidance"
        rule = "eps_u + w*(eps_c - eps_u)" if self.convention == "dit" else "eps_c + s*(eps_c - eps_u)"
        name = "w" if self.convention == "dit" else "s"
        extra = f", only the first {self.channels} channels" if self.channels else ""
        extra += f", DiMR power schedule p={self.power}" if self.power is not None else ""
        return f"cfg {name}={self.scale:g} in the {self.convention} convention ({rule}; w={self.w:g}{extra})"


def guidance_settings(recipe: Mapping[str, Any], scale: float | None = None) -> GuidanceSettings:
    """``sample.cfg`` of the recipe, with ``scale`` (from ``--cfg``) replacing its scale when given.

    An unconditional model has nothing to guide with: its settings say so, and a ``--cfg`` that
    would guide is a mistake (one line), not a flag that is printed and then ignored.
    """
    from zoo.sample import num_classes

    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise UserError(f"the guidance scale is a number, got {scale!r}",
                        suggestion="e.g. cfg=1.5; 1 is no guidance in the dit convention, 0 in the uvit one")
    if scale is not None and not (math.isfinite(scale) and GUIDANCE_SCALE.contains(scale)):
        raise UserError(f"--cfg {scale:g}: a guidance scale must be {GUIDANCE_SCALE.describe()}",
                        suggestion="e.g. --cfg 1.5; 1 is no guidance in the dit convention, 0 in the uvit one")
    cfg = dict((recipe.get("sample") or {}).get("cfg") or {})
    settings = GuidanceSettings(
        scale=scale if scale is not None else cfg.get("scale"),
        convention=cfg.get("convention", "dit"),
        channels=cfg.get("channels"),
        power=cfg.get("power"),
    )
    if settings.scale is not None and num_classes(recipe) is None:
        if scale is not None and settings.active:
            raise UserError(f"--cfg {scale:g}: this model is unconditional, so there is no classifier-free guidance",
                            suggestion="drop --cfg")
        settings = GuidanceSettings(convention=settings.convention)
    return settings


def require_null_label(recipe: Mapping[str, Any], guidance: GuidanceSettings) -> None:
    """Refuse guidance for a recipe without ``diffusion.null_label``: the unconditional half of a
    guided batch is the model's prediction for that label. Checked from the recipe alone, so before
    a paper model's weights load."""
    if guidance.active and _diffusion(recipe).get("null_label") is None:
        off = 1 if guidance.convention == "dit" else 0
        raise UserError(f"classifier-free guidance (scale {guidance.scale:g}, {guidance.convention} convention) "
                        "needs the null label, and this recipe has none", key_path="diffusion.null_label",
                        suggestion=f"sample without guidance (--cfg {off}), or, if the model was trained with "
                        "label dropout, set diffusion.null_label to the label it dropped to")


def check_guidance_channels(guidance: GuidanceSettings, channels: int) -> None:
    """Refuse ``sample.cfg.channels`` beyond the model's channels (it was printed, then guided all)."""
    if guidance.channels is not None and guidance.channels > channels:
        raise UserError(f"sample.cfg.channels is {guidance.channels}, but the model has {channels} channels",
                        key_path="sample.cfg.channels",
                        suggestion=f"at most {channels}, or remove it to guide every channel")


def check_null_label(model: nn.Module, null_label: int | None, data: Mapping[str, Any] | None = None,
                     guidance: GuidanceSettings | None = None) -> None:
    """Refuse a null label the model has no embedding for (it failed at the first dropped label,
    an IndexError deep inside a training step or a guided sample). Backbones say how many labels
    they embed in ``num_labels``; one that does not is not checked. ``data``: the recipe's data
    section, whose ``num_classes`` the fix must keep below the null label too (said in one message),
    and whose dataset may have a class count of its own that no fix can lower (emoji32's 9).
    ``guidance``: the label is needed to sample with these settings (else: to drop labels in training),
    which a model whose every row is a class can do without."""
    from zoo.training.data import class_names

    rows, data = getattr(model, "num_labels", None), data or {}
    data_classes = data.get("num_classes")
    if getattr(model, "null_row", None) is not None and data_classes:  # more classes than the rows before DiT's
        check_label_rows(model, data_classes, from_data=True)  # own null row: that is the mistake to name
    if null_label is None or not rows or null_label < rows:
        return
    fix = f"--set diffusion.null_label={rows - 1}"
    if data_classes is not None and data_classes > rows - 1:  # none left beside the null row: unconditional
        fix += f" --set data.num_classes={rows - 1 or 'null'}"
    if rows > 1 and data_classes is not None and data_classes >= rows:  # every row is a class, or too few rows
        fixes = []
        if data_classes == rows:  # without a null label the model still fits its data
            off = 1 if guidance is None or guidance.convention == "dit" else 0  # the convention's "no guidance"
            fixes.append(f"sample without guidance (--cfg {off}, or sample.cfg.scale: {off} in the recipe)"
                         if guidance else "--set diffusion.label_drop=0")
        dit = "" if data_classes == rows else f" with model.num_classes {data_classes}"
        fixes.append(f"give the model a row for it before training (DiT: model.class_dropout_prob > 0 adds one{dit}; "
                     f"U-ViT and DiMR: model.num_classes {data_classes + 1})")
        suggestion = ", or ".join(fixes)
        if len(class_names(data)) <= rows - 1:  # the dataset can have that few classes (or does not say how many)
            suggestion += f"; {fix} would make class {rows - 1} the null label"  # a class turned into "no class"
        said = "are all classes" if data_classes == rows else "are fewer than the data's classes"
        raise UserError(f"diffusion.null_label is {null_label}, but the model's label rows 0..{rows - 1} {said} "
                        f"(data.num_classes {data_classes}): none is left for the null label",
                        key_path="diffusion.null_label", suggestion=suggestion)
    raise UserError(f"diffusion.null_label is {null_label}, but the model embeds labels 0..{rows - 1} only",
                    key_path="diffusion.null_label",
                    suggestion=f"{fix}: its last label row, where DiT, U-ViT and DiMR keep the null label (or give "
                    "the model more classes: DiT embeds model.num_classes + 1 rows, U-ViT and DiMR model.num_classes)")


def check_label_rows(model: nn.Module, classes: int | None, from_data: bool) -> None:
    """Refuse class labels ``0..classes-1`` that the model has no embedding rows for (``from_data``:
    the count is ``data.num_classes``, else the null label's). Without label dropout nothing else
    compares them before the first step or sample fails on an out-of-range label. A model with a null
    row of its own (``null_row``, DiT's beside its ``num_classes``) has that many class rows."""
    rows, own = getattr(model, "num_labels", None), getattr(model, "null_row", None)
    key = "data.num_classes" if from_data else "diffusion.null_label"
    if own is not None and from_data and classes and classes > own:
        raise UserError(f"data.num_classes is {classes}, but the model has {own} classes (labels 0..{own - 1}; "
                        f"its label row {own} is the null label)", key_path=key,
                        suggestion=f"model.num_classes: {classes} (and diffusion.null_label: {classes}), or "
                        f"data.num_classes: {own} (and diffusion.null_label: {own})")
    if not classes or not rows or classes <= rows:
        return
    raise UserError(f"{key} is {classes}: labels 0..{classes - 1} are classes, but the model embeds labels "
                    f"0..{rows - 1} only", key_path=key,
                    suggestion=f"set {key} to at most {rows}, or give the model more classes (model.num_classes)")


def guided_eps_fn(
    model: nn.Module,
    recipe: Mapping[str, Any],
    schedule: "NoiseSchedule",
    y: Tensor | None,
    guidance: GuidanceSettings | float,
    eps_channels: int | None = None,
) -> GuidedModel:
    """The solver's ``eps_fn`` for ``model``: time mapped, guided as ``guidance`` says (a
    :class:`GuidanceSettings`, or a number: the scale, with the recipe's other settings). ``eps_channels``:
    the channels of the data (default: those of the model's example input)."""
    if isinstance(guidance, (int, float)) and not isinstance(guidance, bool):  # guided_eps_fn(..., 1.5)
        guidance = guidance_settings(recipe, float(guidance))
    if not isinstance(guidance, GuidanceSettings):  # None, True, "1.5": an AttributeError on .active
        raise UserError(f"guidance is a GuidanceSettings or a number (the scale), got {guidance!r}",
                        suggestion="pass guidance_settings(recipe) for the recipe's settings, or a scale in its convention")
    if eps_channels is None:
        from zoo.meta import example_inputs

        with torch.device("meta"):
            eps_channels = int(example_inputs(model)[0].shape[1])
    check_time_input(recipe, model)
    null = _diffusion(recipe).get("null_label")
    active = guidance.active
    if active and y is None:  # guidance compares the labels' prediction with the null label's
        raise UserError(f"classifier-free guidance (scale {guidance.scale:g}, {guidance.convention} convention) "
                        "needs class labels, and y is None",
                        suggestion="pass the labels to guide toward as y, or guidance_settings(recipe, "
                        f"{1 if guidance.convention == 'dit' else 0}) for no guidance")
    require_null_label(recipe, guidance)
    if active:
        check_null_label(model, null, recipe.get("data"), guidance)
        check_guidance_channels(guidance, eps_channels)
    return GuidedModel(
        model,
        time_map(recipe, schedule),
        y=y,
        scale=guidance.scale if active else None,
        convention=guidance.convention,
        null_label=null,
        channels=guidance.channels,
        power=guidance.power,
        eps_channels=eps_channels,
        v_schedule=schedule if prediction(recipe) == "v" else None,
    )
