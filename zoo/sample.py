"""Sampling images from a recipe or a checkpoint: noise → solver → (VAE) → image grid.

Reproducible per sample: sample i's starting noise (and its class, when none is given) comes
from its own generator seeded with ``zoo.seeds.sample_seed(seed, i)``, so the images do not depend on the
batch size or on how samples are split across processes. Stochastic solvers (``ddpm``, ``ddim``
with eta > 0) draw their per-step noise from a third generator per sample
(:func:`zoo.seeds.solver_generators`), so they too give the same images whatever the batch size.

For research code a :class:`SampleRequest` may also give the starting noise ``x_T`` itself and
one class label per sample (as DiT's ``sample.py`` does). Samples come back in the model's
dtype: a float64 model samples in float64 end to end (``zoo sample --dtype float64``).
"""

from __future__ import annotations

import json
import math
import numbers
import operator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from zoo.diffusion.setup import (GuidanceSettings, build_schedule, check_guidance_channels, guidance_settings,
                                 guided_eps_fn, require_null_label)
from zoo.errors import UserError
from zoo.memory import require_sampling_memory, require_weights_memory
from zoo.meta import example_inputs
from zoo.modes import evaluating
from zoo.options import CommandOptions, EVAL_OPTIONS
from zoo.precision import PRECISIONS, inference_precision
from zoo.recipe import override_key
from zoo.seeds import check_seed, initial_noise, label_draw, recipe_seed, sample_labels, solver_generators
from zoo.seeds import sample_seed  # noqa: F401  (the name every eval protocol records: zoo.sample.sample_seed)

if TYPE_CHECKING:
    from zoo.solvers.base import Solver

DEFAULT_N = 16


@dataclass
class SampleRequest:
    """What to sample (the CLI's options; ``None`` means the recipe's ``sample`` section decides).

    ``class_labels``: one label for every sample, or one per sample (default: a random class per
    sample). ``x_T``: the starting noise (n, C, H, W) instead of the seeded one. ``n`` defaults to
    the number of ``x_T`` rows or of labels, else 16. ``respacing``: the respaced chain of
    ``ddpm``/``ddim`` ("250", "10,15,20", "ddim25"); it replaces the recipe's ``steps``.
    ``precision``: the model calls' arithmetic (:mod:`zoo.precision`; default the recipe's
    ``sample.precision``, else the process's own settings).
    """

    n: int | None = None
    seed: int | None = None  # None: the recipe's sample.seed, else 0
    solver: str | None = None
    steps: int | None = None
    cfg: float | None = None
    class_labels: int | Sequence[int] | None = None
    batch_size: int | None = None
    solver_options: dict = field(default_factory=dict)
    respacing: str | None = None
    x_T: Tensor | None = None
    precision: str | None = None

    def label_list(self) -> list[int] | None:
        """``class_labels`` as a list of ints (``None`` if not given)."""
        given = self.class_labels
        if given is None:
            return None
        if torch.is_tensor(given) or hasattr(given, "__array__") and hasattr(given, "shape"):  # tensor, numpy array
            if len(given.shape) == 0:
                given = given.item()
            else:
                given = list(given.reshape(-1).tolist())
        values = [given] if not isinstance(given, Sequence) or isinstance(given, str) else list(given)
        labels = []
        for v in values:
            try:
                labels.append(operator.index(v))  # int, numpy and torch integers; not 2.7 (or "3")
            except TypeError:
                raise UserError(f"class labels are integers, got {v!r}") from None
        if not labels:  # [] reached the model as a y of shape (0,), named as the model's input
            raise UserError("class_labels is empty", suggestion="give one label for every sample, one per sample, "
                            "or None for random classes")
        return labels

    def count(self) -> int:
        """How many samples: ``n``, else the rows of ``x_T`` or the number of labels, else 16."""
        for name in ("n", "seed", "batch_size"):  # 2.0 reached range() as a TypeError; a seed of 1.5 drew seed 1's
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
                raise UserError(f"SampleRequest.{name} must be an integer, got {value!r}")
        implied = {}
        if self.x_T is not None:
            implied["x_T"] = self.x_T.shape[0]
        labels = self.label_list()
        if labels is not None and len(labels) > 1:
            implied["the class labels (--class)"] = len(labels)
        n = self.n if self.n is not None else next(iter(implied.values()), DEFAULT_N)
        for what, count in implied.items():
            if count != n:
                raise UserError(f"{what} give{'s' * (what == 'x_T')} {count} samples but n = {n} were asked for; "
                                f"give {'one label or ' if what != 'x_T' else ''}{n}, or leave n (--n) out")
        if n < 1:
            raise UserError(f"n (--n) must be at least 1, got {n}")
        if self.seed is not None:  # None: the recipe's sample.seed (its schema checks it)
            check_seed(int(self.seed), "seed (--seed)")
        if self.batch_size is not None and self.batch_size < 1:
            raise UserError(f"batch_size (--batch-size) must be at least 1, got {self.batch_size}")
        return n


def label_names(source: str | Path, recipe: Mapping[str, Any]) -> list[str]:
    """The class names ``--class NAME`` resolves against, in label order: those a checkpoint recorded
    when it was trained, else its data's as they are now (a recipe's, or a checkpoint that predates
    the record); ``[]`` when neither knows them."""
    from zoo.checkpoint import read_classes
    from zoo.training.data import class_names

    recorded = read_classes(source) if Path(source).is_dir() else []
    return recorded or class_names(recipe.get("data") or {})


def parse_class_labels(text: str | None, names: Sequence[str] = ()) -> list[int] | None:
    """``--class 3``, ``--class 3,7,207`` or class names as a list of ints (``None`` when not given).

    A part that is not a number is looked up in ``names`` (the dataset's classes, label order):
    the whole name or the start of one name, in any case and Unicode normalisation (a folder named
    on macOS is stored decomposed: ``café`` as ``cafe`` + accent); a whole ``text`` that is one
    name is that class even when the name holds a comma (``dogs, wild``).
    """
    if text is None:
        return None
    whole = [i for i, name in enumerate(names) if _fold(name) == _fold(str(text).strip())]
    if "," in str(text) and len(whole) == 1:
        return whole
    return [_class_label(part.strip(), text, names) for part in str(text).split(",")]


def _fold(name: str) -> str:
    """``name`` for matching: NFC-normalised and case-folded."""
    import unicodedata

    return unicodedata.normalize("NFC", name).casefold()


def _class_label(part: str, text: str, names: Sequence[str]) -> int:
    try:
        label = int(part)
    except ValueError:
        pass
    else:  # numbers are labels; say so where a class folder is named like another label's number
        named = [i for i, name in enumerate(names) if name == part and i != label]
        if named:
            import sys

            shown = f" ({names[label]!r})" if 0 <= label < len(names) else ""
            print(f"zoo: warning: --class {part} is label {part}{shown}; the class named {part!r} is label "
                  f"{named[0]} (--class {named[0]})", file=sys.stderr)
        return label
    if not names:
        raise UserError(f"--class {text!r}: {part!r} is not a class number, and this model's dataset "
                        f"names no classes (give numbers, e.g. 3,7,207)")
    folded, wanted = [_fold(name) for name in names], _fold(part)
    exact = [i for i, name in enumerate(folded) if name == wanted]
    starts = [i for i, name in enumerate(folded) if part and name.startswith(wanted)]
    found = exact or starts
    if len(found) == 1:
        return found[0]
    what = f"matches {', '.join(repr(names[i]) for i in found)}" if found else "is not one of its classes"
    shown = ", ".join(f"{i} {name}" for i, name in enumerate(names[:12])) + (", ..." if len(names) > 12 else "")
    raise UserError(f"--class {text!r}: {part!r} {what}", suggestion=f"the classes are {shown}")


def build_solver(recipe: Mapping[str, Any], name: str | None, steps: int | None, options: Mapping[str, Any] = (),
                 respacing: str | None = None) -> tuple["Solver", dict[str, Any]]:
    """The recipe's ``sample.solver`` with ``name``/``steps``/``respacing`` replacing its own.

    Another solver type drops the recipe's options; ``steps`` replaces a recipe's ``respacing``
    and ``respacing`` its ``steps`` (the two name the same chain).
    """
    import zoo

    spec = (recipe.get("sample") or {}).get("solver") or {"type": "dpm_solver++", "steps": 25}
    spec = {"type": spec} if isinstance(spec, str) else dict(spec)
    if name is not None and name != spec["type"]:
        spec = {"type": name}
    if steps is not None:
        spec.pop("respacing", None)
        spec["steps"] = steps
    if respacing is not None:
        if steps is None:
            spec.pop("steps", None)
        spec["respacing"] = str(respacing)
    spec.update(options)
    try:
        return zoo.build_component("solver", spec), spec
    except UserError as err:
        _name_the_option(err, name, steps, respacing)
        raise


def _name_the_option(err: UserError, solver: str | None, steps: int | None, respacing: str | None) -> None:
    """Point a solver's error at the command-line option that set its key (``--steps 1001: key
    sample.solver.steps: ...``), not at the "<solver spec>" it was built from."""
    key = (err.key_path or "").removeprefix("sample.solver").lstrip(".").split(".")[0]
    given = {"type": ("--solver", solver), "steps": ("--steps", steps), "respacing": ("--respacing", respacing)}
    flag, value = given.get(key, (None, None))
    err.file, err.line = (f"{flag} {value}" if value is not None else None), None
    err.key_path = "sample.solver" + (f".{key}" if key else "")
    if key == "respacing" and "unknown parameter" in err.message:
        err.suggestion = "--respacing walks ADM's respaced chain: solvers ddpm and ddim"


def num_classes(recipe: Mapping[str, Any]) -> int | None:
    """Real classes to draw labels from (the null label excluded); ``None`` for unconditional models."""
    model = recipe.get("model") or {}
    declared = model.get("num_classes") if isinstance(model, Mapping) else None
    if declared is not None and declared <= 0:
        return None
    null = (recipe.get("diffusion") or {}).get("null_label")
    data = (recipe.get("data") or {}).get("num_classes")
    if data and null is not None and data > null:  # null 0 included: it would be a real label
        raise UserError(f"data.num_classes is {data}, but diffusion.null_label {null} is one of its labels "
                        f"0..{data - 1}", key_path="diffusion.null_label", suggestion=f"set diffusion.null_label "
                        f"to {data} (a label of its own), or data.num_classes to "
                        + (f"at most {null}" if null else "null (a model whose only label is the null label is "
                           "unconditional)"))
    if data and null is None and declared and data > declared:
        raise UserError(f"data.num_classes is {data}, but the model embeds only {declared} classes (model.num_classes)",
                        key_path="data.num_classes", suggestion=f"set data.num_classes to at most {declared}, or "
                        "give the model more classes (model.num_classes)")
    # labels 0..null-1 have an embedding of their own; null label 0 leaves none: unconditional
    return (data or (null if null is not None else declared)) or None


def load_model(source: str | Path, overrides: Sequence[str] = (), device: torch.device | str = "cpu",
               dtype: torch.dtype | None = None, solver: str | None = None,
               weights: str | None = None) -> tuple[nn.Module, dict, str]:
    """The model to sample from and its resolved recipe, and a word on where the weights came from.

    ``source`` is a checkpoint directory (``config.json`` + weights; EMA weights preferred) or a
    recipe (a freshly initialised model). ``--set`` overrides apply to the recipe's other
    sections; a checkpoint's ``model`` section is fixed by its weights. ``dtype`` casts the model
    (float64 for parity checks; samples come back in it). ``solver`` (``--solver``) becomes the
    recipe's solver before the overrides apply, so ``--set sample.solver.KEY=...`` reaches its options.
    ``weights``: a checkpoint's ``"ema"`` or ``"model"`` (raw) weights (default: EMA where it has them).
    """
    recipe = sample_recipe(source, overrides, solver)
    model, origin = model_for(source, recipe, device, dtype, weights)
    return model, recipe, origin


def model_for(source: str | Path, recipe: Mapping[str, Any], device: torch.device | str = "cpu",
              dtype: torch.dtype | None = None, weights: str | None = None) -> tuple[nn.Module, str]:
    """The model of :func:`load_model` for a recipe :func:`sample_recipe` already resolved, and where its
    weights came from: commands that check the recipe first read it once."""
    import zoo
    from zoo.checkpoint import EMA, load_checkpoint, read_whole

    path = Path(source)
    require_weights_memory(recipe, device, _bytes_per_param(dtype))
    if path.is_dir() or not _names_a_recipe(source):  # (a checkpoint deleted since its recipe was read is none)
        def read() -> tuple[nn.Module, str]:
            kind = weights or ("ema" if (path / EMA).is_file() else "model")
            model, _ = load_checkpoint(path, weights=kind, device=device, recipe=recipe)  # read once, with overrides
            return model, f"{kind} weights of {path}"

        model, origin = read_whole(path, read, was_read=True)  # one save's weights, never a fresh model instead
    else:  # initialised as zoo train initialises it (torch.manual_seed(train.seed)): the same weights each time
        from zoo.training.sections import TRAIN_DEFAULTS

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int((recipe.get("train") or {}).get("seed", TRAIN_DEFAULTS["seed"])))
            model = zoo.build_model(recipe)
        model = model.to(device)
        origin = "NO weights: a freshly initialised model (pass a checkpoint directory for real samples)"
    if dtype is not None:
        model = model.to(dtype)
    return model.eval(), origin


def _names_a_recipe(source: str | Path) -> bool:
    """Whether ``source`` is a recipe (a file, or a shipped recipe's name) rather than a checkpoint."""
    from zoo.recipe import find_recipe

    try:
        find_recipe(source)
    except UserError:
        return False
    return True


def sample_recipe(source: str | Path, overrides: Sequence[str] = (), solver: str | None = None) -> dict:
    """The recipe :func:`load_model` samples ``source`` with: ``--set`` overrides applied as ``zoo sample``
    and ``zoo eval`` allow them (a checkpoint's ``model`` section and the ``diffusion`` keys its weights
    were trained under are refused; ``solver`` with ``--set sample.solver.KEY=...`` as in :func:`load_model`).
    Reads no weights: cheap enough to check a command's options before anything slow."""
    from zoo.api import load_model_recipe
    from zoo.checkpoint import CONFIG, load_recipe_of

    path = Path(source)
    read = (lambda o: load_recipe_of(path, o)) if path.is_dir() else (lambda o: load_model_recipe(source, o))
    given = list(overrides)
    chosen = _solver_choice(read, solver, given)
    overrides = [*chosen, *given]
    if path.is_dir() and any(override_key(o)[0] == "model" for o in overrides):
        read([])  # a folder that holds no checkpoint says so, not that its weights fix the model
        raise UserError(f"{path} is a checkpoint: its model section is fixed by its weights; "
                        "--set may change the other sections only")
    try:
        recipe = read(overrides)  # a mistake in a checkpoint's names its config.json
    except UserError as err:
        if chosen and err.file == f"--set {chosen[0]}":  # the override --solver made, not one the user typed
            err.file, err.line = f"--solver {solver}", None
        recorded = path.is_dir() and err.file == str(path / CONFIG)  # not the user's --set
        if recorded and solver is None and (err.key_path or "").startswith("sample.solver"):
            other = "sample with one of the known solvers: --solver NAME"  # they sample the same weights
            err.suggestion = f"{err.suggestion}; or {other}" if err.suggestion else other
        raise
    if solver is not None and any(override_key(o) in (("sample", "solver"), ("sample", "solver", "type"))
                                  for o in given):
        _require_same_solver(recipe, solver)
    if path.is_dir() and any(override_key(o)[0] == "diffusion" for o in given):
        _refuse_trained_changes(path, read, recipe)
    return recipe


#: The ``diffusion`` keys a checkpoint's weights were trained under: what its outputs mean at each time.
TRAINED_DIFFUSION_KEYS = ("schedule", "prediction", "time_input", "null_label")


def _refuse_trained_changes(path: Path, read: Callable[[list[str]], dict], recipe: Mapping[str, Any]) -> None:
    """Refuse ``--set`` values that change a ``diffusion`` key checkpoint ``path`` was trained under.

    The same value is no change (a schedule by name equals its table with the constructor defaults),
    and a key the checkpoint does not set (a model-only recipe's ``time_input``) may be given: only
    then can such a checkpoint sample at all. Where the checkpoint has a ``diffusion`` section, its
    absent ``schedule`` and ``prediction`` are the defaults it was trained under (DDPM's linear betas,
    eps), as fixed as written ones.
    """
    from zoo.diffusion.sections import DIFFUSION_DEFAULTS
    from zoo.recipe_diff import first_difference

    try:
        own = dict(read([]).get("diffusion") or {})
    except UserError:  # it loads only with the user's overrides: they are what makes it usable
        return
    now = dict(recipe.get("diffusion") or {})
    if own:
        for key in ("schedule", "prediction"):
            own.setdefault(key, DIFFUSION_DEFAULTS[key])
            now.setdefault(key, DIFFUSION_DEFAULTS[key])
    for key in TRAINED_DIFFUSION_KEYS:
        if own.get(key) is not None and first_difference(own[key], now.get(key), f"diffusion.{key}",
                                                         kinds=("schedule",)):
            fixed = ", ".join(f"diffusion.{k}" for k in TRAINED_DIFFUSION_KEYS)
            raise UserError(f"{path} is a checkpoint: --set diffusion.{key} would change what its weights were "
                            f"trained to predict ({fixed} are fixed by its training)",
                            suggestion="sample with the checkpoint's own; change them for a new run with "
                                       "zoo train --set")


def _bytes_per_param(dtype: torch.dtype | None) -> int:
    """Bytes of one weight while it is loaded (float32) and cast to a wider ``dtype``: both are alive at once
    (a DiT-L/2 loaded with --dtype float64 peaked at 12 bytes per parameter, not 8)."""
    return 4 + dtype.itemsize if dtype is not None and dtype.itemsize > 4 else 4


def _require_same_solver(recipe: Mapping[str, Any], name: str) -> None:
    """Refuse ``--solver NAME`` when ``--set sample.solver...`` names another type: one of the two would be dropped."""
    spec = (recipe.get("sample") or {}).get("solver") or {}
    chosen = spec if isinstance(spec, str) else spec.get("type")
    if chosen is not None and chosen != name:
        raise UserError(f"--solver {name} and --set sample.solver (type {chosen}) name two solvers",
                        suggestion=f"give one: --solver {name} with --set sample.solver.KEY=VALUE for its options, "
                                   f"or --set sample.solver={{type: {chosen}, ...}} alone")


def _solver_choice(read: Callable[[list[str]], dict], name: str | None, overrides: list[str]) -> list[str]:
    """The override that makes solver ``name`` the recipe's, with its own defaults; none when it already is.

    Only needed when ``--set`` touches ``sample.solver``, or the recorded solver cannot be read here (an
    uninstalled plugin's): otherwise :func:`build_solver` swaps the solver after loading. A recipe that only
    loads with the user's overrides keeps them as they are.
    """
    if name is None:
        return []
    try:
        spec = (read([]).get("sample") or {}).get("solver") or {}
    except UserError as err:  # a recorded solver unknown here (an uninstalled plugin's): --solver replaces it
        return [f"sample.solver={{type: {json.dumps(name)}}}"] if (err.key_path or "").startswith("sample.solver") \
            else []
    if not any(override_key(o)[:2] == ("sample", "solver") for o in overrides):
        return []
    current = spec if isinstance(spec, str) else spec.get("type")
    return [] if current == name else [f"sample.solver={{type: {json.dumps(name)}}}"]


def _check_labels(request: SampleRequest, classes: int | None) -> list[int] | None:
    """The request's own labels (``None``: random ones, or none for an unconditional model), refused
    where the model cannot take them; nothing drawn (a --n of millions costs nothing here)."""
    given = request.label_list()
    if classes is None and given is not None:
        raise UserError("class labels (--class) were given but this model is unconditional")
    bad = [v for v in given or () if not 0 <= v < classes]
    if bad:
        raise UserError(f"class label {bad[0]} (--class) is not a class of this model (0..{classes - 1})")
    return given


def _labels(request: SampleRequest, n: int, classes: int | None, draw: str = "random") -> Tensor | None:
    """One label per sample: the request's (one for all, or one each), else classes drawn as ``draw``
    (the recipe's ``sample.labels``: seeded random or balanced)."""
    given = _check_labels(request, classes)
    if classes is None:
        return None
    if given is None:
        return sample_labels(n, classes, request.seed, draw=draw)
    return torch.tensor(given * n if len(given) == 1 else given, dtype=torch.long)


def check_before_weights(recipe: Mapping[str, Any], solver: str | None, steps: int | None, respacing: str | None,
                         precision: str | None, dtype: torch.dtype | None, options: Mapping[str, Any] = (),
                         request: SampleRequest | None = None) -> None:
    """Refuse from the recipe alone what sampling would refuse after the weights load (seconds for a
    paper model): a solver that cannot walk the schedule (``--respacing 1001`` of 1000 steps, one
    step kept where the image is mostly signal), a precision the dtype cannot take, and the
    ``request``'s class labels and guidance scale where it is given."""
    try:
        built = check_solver_walks(recipe, solver, steps, options, respacing)
    except UserError as err:
        if err.key_path and err.key_path.startswith("sample.solver"):
            _name_the_option(err, solver, steps, respacing)
        raise
    if getattr(built, "variance", None) == "learned":
        _check_learned_variance(recipe)
    sampling_precision(recipe, precision, dtype or torch.float32)
    if request is not None:
        request.count()  # a --class list of another length than --n, before a paper model's weights load
        _check_labels(request, num_classes(recipe))
        guidance = guidance_settings(recipe, request.cfg)
        require_null_label(recipe, guidance)
        if guidance.active and guidance.channels is not None:
            check_guidance_channels(guidance, _data_channels(recipe))


def _data_channels(recipe: Mapping[str, Any]) -> int:
    """The channels the recipe's model samples, from its example input built on the meta device (no
    weights: U-ViT names them ``in_chans``, DiT and DiMR ``in_channels``, a ``_target_`` model anything)."""
    import zoo
    from zoo.meta import example_inputs

    with torch.device("meta"):
        return int(example_inputs(zoo.build_model(recipe))[0].shape[1])


def check_solver_walks(recipe: Mapping[str, Any], solver: str | None = None, steps: int | None = None,
                       options: Mapping[str, Any] = (), respacing: str | None = None) -> Any:
    """The solver the recipe (and the given options) build, checked to walk the recipe's schedule: a DDPM/DDIM
    chain respaced to more steps than the schedule has (``steps: 2000`` of 1000, ``respacing: ddim999``), or
    one that keeps a single step where the image is mostly signal, is refused from the recipe alone."""
    built, _ = build_solver(recipe, solver, steps, options, respacing=respacing)
    chain = getattr(built, "chain", None)  # ddpm/ddim: the respaced chain of the recipe's schedule
    if callable(chain):
        chain(build_schedule(recipe))
    elif callable(getattr(built, "time_range", None)):  # a time grid: t_start/t_end within the schedule
        built.time_range(build_schedule(recipe))
    return built


def _check_learned_variance(recipe: Mapping[str, Any]) -> None:
    """DDPM's ``variance: learned`` reads the model's variance output: refused for a model that has none
    (a registered backbone's ``learn_sigma`` says; a ``_target_`` model's output decides at its first call)."""
    from zoo import registry
    from zoo.diffusion.sections import learns_sigma

    model = recipe.get("model")
    known = isinstance(model, dict) and ("learn_sigma" in model or model.get("type") in registry.names("backbone"))
    if known and not learns_sigma(model):
        raise UserError("ddpm variance 'learned' reads the model's variance output, and this model has none "
                        "(model.learn_sigma is false)", key_path="sample.solver.variance",
                        suggestion="use variance fixed_small (DDPM's, the default) or fixed_large")


def refuse_non_finite(x: Tensor, what: str, kept: str, precision: str | None = None) -> None:
    """Refuse samples ``x`` (B, ...) that hold NaN or inf: saved, they read as black images (a grid
    that looks dark, an FD that scores them). ``what`` names the samples, ``kept`` what is not written,
    ``precision`` the one they were sampled at (:func:`sampling_precision`): fp16's range is named first."""
    bad = int((~torch.isfinite(x.flatten(1)).all(dim=1)).sum())
    if not bad:
        return
    advice = "check the weights (zoo parity / a newer checkpoint) or try --solver ddpm"
    if precision == "fp16":  # weights that sample fine in fp32 or bf16 can overflow fp16's activations
        raise UserError(f"{bad} of {what} hold NaN or inf (sampled at precision fp16, whose largest value is "
                        f"65504: the model's activations likely overflow it); {kept}",
                        suggestion=f"sample with --precision bf16 or fp32; if still not finite, {advice}")
    raise UserError(f"{bad} of {what} hold NaN or inf (the model's outputs, or the solver with these "
                    f"settings, are not finite); {kept}", suggestion=advice)


def sampling_precision(recipe: Mapping[str, Any], given: str | None, dtype: torch.dtype) -> str | None:
    """The precision to sample at: ``given`` (``--precision``), else the recipe's ``sample.precision``, else
    ``None`` (the process's own settings: PyTorch's defaults, or ``train.tf32`` inside ``zoo train``).
    A float64 model (``--dtype float64``, for parity checks) samples in float64 whatever the recipe says
    (TF32 and autocast leave float64 alone); a lower ``given`` precision for it is refused."""
    if given is not None and given not in PRECISIONS:
        raise UserError(f"unknown precision {given!r}", suggestion=f"use one of {', '.join(PRECISIONS)}")
    if dtype == torch.float64:
        if given not in (None, "fp32"):
            raise UserError(f"a float64 model samples in float64; precision {given} would compute in less",
                            suggestion="leave out --dtype float64, or sample with --precision fp32")
        return None
    return given or (recipe.get("sample") or {}).get("precision")


def check_sample_section(recipe: Mapping[str, Any]) -> None:
    """Build the recipe's solver and guidance as :func:`sample_latents` will: a training run that
    draws grids or evaluates checks them before its first step (a solver option that cannot work
    stopped the run at its first evaluation, without saving, or turned every grid into a warning): a
    learned variance needs a model that outputs one, and guidance the null label (else the run drew
    no grid, and zoo sample refused its checkpoints with the recipe's own settings)."""
    def guidance() -> None:
        settings = guidance_settings(recipe, None)
        try:
            require_null_label(recipe, settings)
        except UserError as err:
            off = 1 if settings.convention == "dit" else 0
            err.suggestion = (f"set sample.cfg.scale to {off} (no guidance), or train with label dropout "
                              "(diffusion.label_drop and diffusion.null_label) so that guidance has a null label")
            raise

    for key, check in (("sample.solver", lambda: check_solver_walks(recipe)),
                       ("sample.solver.variance", lambda: _check_sample_variance(recipe)),
                       ("sample.cfg", guidance)):
        try:
            check()
        except UserError as err:
            raise err.locate(key_path=err.key_path or key) from None


def _check_sample_variance(recipe: Mapping[str, Any]) -> None:
    """The recipe's DDPM ``variance: learned`` needs a model that outputs one: else zoo sample refuses it once the
    weights load, and zoo convert wrote such a checkpoint (a learn_sigma false DiT on a DiT recipe) without a word."""
    solver = (recipe.get("sample") or {}).get("solver")
    if isinstance(solver, Mapping) and solver.get("variance") == "learned":
        try:
            _check_learned_variance(recipe)
        except UserError as err:
            err.suggestion = "--set sample.solver.variance=fixed_small (DDPM's own), or fixed_large"
            raise


@torch.no_grad()
def sample_latents(
    model: nn.Module, recipe: Mapping[str, Any], request: SampleRequest, device: torch.device | str = "cpu",
    progress: Callable[[int], None] | None = None, options: CommandOptions = EVAL_OPTIONS,
) -> tuple[Tensor, Tensor | None]:
    """Sample ``request.count()`` model-space tensors (latents or pixels in [−1, 1]) and their labels.

    The samples are on the CPU in the model's dtype (a float64 model samples in float64 throughout).
    The model runs in eval mode and comes back in the modes it had. ``progress(1)`` is called after
    each model call (a progress bar's ``update``). ``options``: what messages call the caller's options
    (zoo sample's flags; zoo train's grids: its recipe keys).
    """
    with evaluating(model):
        return _sample_latents(model, recipe, request, device, progress, options)


def _counted(eps_fn: Callable[[Tensor, Tensor], Tensor], progress: Callable[[int], None] | None):
    if progress is None:
        return eps_fn

    def call(x: Tensor, t: Tensor) -> Tensor:
        out = eps_fn(x, t)
        progress(1)
        return out

    return call


def _sample_latents(model: nn.Module, recipe: Mapping[str, Any], request: SampleRequest,
                    device: torch.device | str, progress: Callable[[int], None] | None = None,
                    options: CommandOptions = EVAL_OPTIONS) -> tuple[Tensor, Tensor | None]:
    schedule = build_schedule(recipe)
    solver, _ = build_solver(recipe, request.solver, request.steps, request.solver_options, request.respacing)
    guidance: GuidanceSettings = guidance_settings(recipe, request.cfg)
    request = replace(request, seed=recipe_seed(recipe, request.seed))  # a given seed as it is: count() checks it
    x_example = example_inputs(model)[0]
    shape, dtype = tuple(x_example.shape[1:]), x_example.dtype
    n = request.count()
    if request.x_T is not None and tuple(request.x_T.shape[1:]) != shape:
        raise UserError(f"x_T has samples of shape {tuple(request.x_T.shape[1:])}; this model samples {shape}")
    labels = _labels(request, n, num_classes(recipe), label_draw(recipe))
    precision = sampling_precision(recipe, request.precision, dtype)
    batch = request.batch_size or (recipe.get("sample") or {}).get("batch_size") or n
    require_sampling_memory(recipe, device, min(batch, n), guided=labels is not None and guidance.active,
                            options=options)
    out = []
    for start in range(0, n, batch):
        size = min(batch, n - start)
        x_T = initial_noise(size, shape, request.seed, start) if request.x_T is None else request.x_T[start : start + size]
        x_T = x_T.to(device=device, dtype=dtype)
        y = None if labels is None else labels[start : start + size].to(device)
        eps_fn = _counted(guided_eps_fn(model, recipe, schedule, y, guidance, eps_channels=shape[0]), progress)
        generators = solver_generators(request.seed, start, size)
        with inference_precision(precision, device):
            out.append(solver.sample(eps_fn, x_T, schedule=schedule, generator=generators).cpu())
    return torch.cat(out), labels


def vae_weights(recipe: Mapping[str, Any], vae_dir: str | Path | None,
                options: CommandOptions = EVAL_OPTIONS) -> Path | None:
    """The VAE weights a latent model decodes with (``--vae``, else ``data.vae``, else the VAE that
    ``data.root``'s latents were prepared with, where it still lies; in a folder of several weight
    files, the one ``data.vae_file`` names); ``None`` for pixel models.

    Called before sampling, so a missing VAE is reported before any compute is spent. ``options``:
    what its messages call the caller's VAE option (zoo train's is data.vae).
    """
    from zoo.training.data import gives_latents

    data = recipe.get("data") or {}
    if not gives_latents(data):
        if vae_dir is not None:  # it was accepted and ignored
            raise UserError(f"--vae {vae_dir}: this model samples pixels (its recipe's data are images, not latents), "
                            "so there is nothing to decode", suggestion="drop --vae")
        return None
    from zoo.latents import check_decoder_fits, prepared_with_vae
    from zoo.vae import check_vae_weights, find_vae_weights

    weights = find_vae_weights(vae_dir or data.get("vae") or prepared_with_vae(data), options, data.get("vae_file"))
    check_vae_weights(weights, options)  # another network's weights (a zoo checkpoint): said now, not at each decode
    check_decoder_fits(weights, data, options)
    return weights


def load_decoder(recipe: Mapping[str, Any], vae_dir: str | Path | None, device: torch.device | str = "cpu",
                 options: CommandOptions = EVAL_OPTIONS) -> nn.Module | None:
    """The SD VAE that turns a latent model's samples into images (``None`` for a pixel model).

    Load it once before sampling: bad or missing weights then fail before any sampling is done,
    and a long run decodes every batch with the same copy. ``options``: as in :func:`vae_weights`.
    """
    weights = vae_weights(recipe, vae_dir, options)
    if weights is None:
        return None
    from zoo.vae import SCALE, load_vae

    return load_vae(weights, device=device, scale=(recipe.get("data") or {}).get("vae_scale", SCALE), options=options)


def to_images(x: Tensor, recipe: Mapping[str, Any], vae_dir: str | Path | None, device: torch.device | str = "cpu",
              decoder: nn.Module | None = None) -> Tensor:
    """Model-space samples → images in [0, 1]: latents through the SD VAE (``decoder``, else loaded
    from ``vae_dir``), pixels mapped from [−1, 1]."""
    x = x.float()  # samples come in the model's dtype; images and the VAE are float32
    decoder = decoder or load_decoder(recipe, vae_dir, device)
    if decoder is not None:
        x = decoder.decode(x.to(device)).cpu()
    return ((x.clamp(-1.0, 1.0) + 1.0) / 2.0).float()


def image_grid(images: Tensor, nrow: int, padding: int = 2, pad_value: float = 1.0) -> Tensor:
    """Tile (B, C, H, W) into one (C, H', W') image, ``nrow`` per row, ``padding`` px around every tile
    (torchvision's ``make_grid`` layout, without importing torchvision)."""
    b, c, h, w = images.shape
    rows = math.ceil(b / nrow)
    step_h, step_w = h + padding, w + padding
    grid = images.new_full((c, rows * step_h + padding, nrow * step_w + padding), pad_value)
    for i in range(b):
        r, col = divmod(i, nrow)
        grid[:, padding + r * step_h : padding + r * step_h + h, padding + col * step_w : padding + col * step_w + w] = images[i]
    return grid


GRID_SOFTWARE = "zoo"


def save_grid(images: Tensor, path: str | Path, nrow: int | None = None) -> Path:
    """Write images (B, C, H, W) in [0, 1] as one 8-bit PNG grid, atomically; nrow defaults to ⌈√B⌉.

    One or three channels are grey or RGB; any other count (a pixel model on 4-channel data, say) is
    drawn one grey tile per channel, a sample's channels side by side, not read as RGBA or refused.
    """
    from PIL import Image

    from zoo.atomic import write_file

    b, c = images.shape[:2]
    nrow = nrow or math.ceil(math.sqrt(b))
    if c not in (1, 3):
        images, nrow = images.reshape(b * c, 1, *images.shape[2:]), nrow * c
    grid = image_grid(images.float().clamp(0.0, 1.0), nrow)
    pixels = grid.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    from PIL.PngImagePlugin import PngInfo

    image = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
    info = PngInfo()
    info.add_text("Software", GRID_SOFTWARE)  # how zoo train tells its grids from a user's files of the same name
    return write_file(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))
