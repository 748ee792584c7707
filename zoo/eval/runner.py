"""``zoo eval``: sample N images from a checkpoint into resumable shards, extract features, score them.

Samples go to ``RUN/eval/samples-<checkpoint>-<protocol hash>/shard-<start>-<stop>.npz`` (uint8
images N×H×W×3, labels, sample indices), each written atomically after its batch; a second
run with the same protocol samples only the indices no shard holds yet, and sample i is the
same image however the work was split (its noise, label and solver noise come from its own
seeds, ``zoo.seeds.sample_seed``). The result, with the full protocol (checkpoint and weights
hash, the recipe's model and diffusion sections, EMA or raw weights, solver with its steps or
respacing and options, guidance, N, seeds, extractor and its weights hash, reference, zoo version,
the ``--set`` overrides), goes to
``RUN/eval/<checkpoint>-<extractor>-n<N>-<hash>-ref<hash of --ref>.json``, the extractor followed by
``~<hash of its identity>`` where its name does not pin its weights (a plugin's, one given a weights file).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from zoo.errors import UserError, reported_by_rank_0
from zoo.training.crop import IMAGE_DECODING
from zoo.meta import example_inputs
from zoo.eval.metrics import compute_metrics
from zoo.eval.reference import (NPZ_ERRORS, array_batches, extract, load_reference, save_npz, save_text, to_uint8,
                                unreadable_npz)
from zoo.training.sections import data_setting

SHARD = re.compile(r"^shard-(\d{7,})-(\d{7,})\.npz$")  # 8 digits from sample 10,000,000 on


@dataclass
class EvalRequest:
    """What ``zoo eval`` was asked (``None``: the recipe's ``sample`` section or a default decides).

    ``overrides``: ``--set KEY=VALUE`` on the checkpoint's recipe, allowed as ``zoo sample`` allows them
    (:func:`zoo.sample.sample_recipe`); ``respacing``: the ``ddpm``/``ddim`` chain ("250", "ddim25"),
    replacing ``steps``; ``solver_options``: solver keys set on top (Python callers; the CLI's
    ``--set sample.solver.KEY=VALUE`` reaches the same spec). All of them land in the solver spec or the
    other protocol keys that name the samples, so two requests share shards only when they sample alike.
    """

    source: str
    n: int | None = None
    ref: str | None = None
    extractor: str = "efficientnet_lite0"
    extractor_weights: str | None = None
    solver: str | None = None
    steps: int | None = None
    cfg: float | None = None
    batch_size: int | None = None
    seed: int | None = None
    weights: str = "ema"
    out: str | None = None
    vae: str | None = None
    device: str | None = None
    solver_options: dict = field(default_factory=dict)
    precision: str | None = None
    respacing: str | None = None
    overrides: list[str] = field(default_factory=list)


def locate(source: str | Path) -> tuple[Path, Path]:
    """(checkpoint directory, eval directory) of a run directory (its newest checkpoint) or a checkpoint.

    A checkpoint inside a run (``RUN/step_0001000``, ``RUN/last``) evaluates into ``RUN/eval``:
    checkpoint directories are replaced whole when saved, so nothing is written inside them.
    """
    from zoo.checkpoint import checkpoint_of, newest_step_hint, run_of

    path = Path(source).expanduser()
    found = checkpoint_of(path)
    if found.parent == path:  # a run directory: its last/ (on a read-only copy, maybe the save replacing it)
        return found, path / "eval"
    path = found  # a checkpoint, or on a read-only copy the newer save of it, read where it lies
    if not path.exists():
        raise UserError(f"{path} does not exist", suggestion="pass a run directory (its newest checkpoint is "
                        "evaluated: last/, or a step_*/ saved after it) or a checkpoint directory")
    if not (path / "config.json").is_file():
        raise UserError(f"{path} is neither a run directory (with last/) nor a checkpoint directory (config.json)",
                        suggestion=newest_step_hint(path))  # a run without its last/: its newest step
    run = run_of(path)
    return path, (run / "eval" if run is not None else path.parent / f"{path.name}-eval")


def _sha256(path: Path) -> str:
    from zoo.eval.extractors import sha256_file

    return sha256_file(path)


def _hashed_model(request: EvalRequest, recipe: dict, ckpt: Path, device: torch.device,
                  tries: int = 3) -> tuple[torch.nn.Module, str, Path, str]:
    """The model of ``ckpt`` with the file its weights came from and that file's sha256, both from one
    save: a run saving into ``ckpt`` meanwhile (its ``last/``) would have the samples keyed by the hash
    of other weights than they were drawn from, and a later eval of those weights reuse them."""
    import zoo.sample
    from zoo.checkpoint import EMA, MODEL, read_whole

    def read() -> tuple[torch.nn.Module, str, Path, str]:
        model, origin = zoo.sample.model_for(ckpt, recipe, device=device,
                                             weights="model" if request.weights == "raw" else None)  # EMA where saved
        if request.weights == "raw":
            origin, weights_file = f"raw weights of {ckpt}", ckpt / MODEL
        else:
            weights_file = ckpt / (EMA if (ckpt / EMA).is_file() else MODEL)
        return model, origin, weights_file, _sha256(weights_file)

    return read_whole(ckpt, read, tries)


def _sample_range(model, recipe: dict, solver, schedule, guidance, start: int, stop: int, seed: int, device,
                  decoder: torch.nn.Module | None = None, precision: str | None = None):
    """Samples ``start .. stop-1`` as uint8 images (B, 3, H, W) and their labels, with global per-sample seeds.
    ``decoder``: a latent model's VAE (:func:`zoo.sample.load_decoder`), loaded once by the caller;
    ``precision``: the model calls' arithmetic (:mod:`zoo.precision`).

    ``zoo.sample.sample_latents`` numbers a request's samples from 0 (also the solver noise of a
    given ``x_T``); a range of a larger run needs its noise, labels and solver noise by global index.
    """
    from zoo.diffusion.setup import guided_eps_fn
    from zoo.precision import inference_precision
    from zoo.sample import num_classes, refuse_non_finite, to_images
    from zoo.seeds import initial_noise, label_draw, sample_labels, solver_generators

    x_example = example_inputs(model)[0]
    shape, dtype = tuple(x_example.shape[1:]), x_example.dtype
    count, classes = stop - start, num_classes(recipe)
    x_T = initial_noise(count, shape, seed, start).to(device=device, dtype=dtype)
    labels = None if classes is None else sample_labels(count, classes, seed, start, label_draw(recipe))
    eps_fn = guided_eps_fn(model, recipe, schedule, None if labels is None else labels.to(device), guidance,
                           eps_channels=shape[0])
    generators = solver_generators(seed, start, count)
    with inference_precision(precision, device):
        x = solver.sample(eps_fn, x_T, schedule=schedule, generator=generators)
    refuse_non_finite(x, f"samples {start}..{stop - 1}", "no shard written for them, and no score", precision)
    images = to_images(x.float().cpu(), recipe, None, device=device, decoder=decoder)
    return to_uint8(images * 2 - 1), labels


def existing_shards(directory: Path) -> list[tuple[int, int, Path]]:
    """(start, stop, path) of the sample shards in ``directory``, by start."""
    if not directory.is_dir():
        return []
    found = [(int(m[1]), int(m[2]), p) for p in directory.iterdir() if (m := SHARD.match(p.name))]
    return sorted(found)


def missing_ranges(n: int, shards: list[tuple[int, int, Path]], batch: int) -> list[tuple[int, int]]:
    """Index ranges of at most ``batch`` in [0, n) that no shard covers."""
    done = np.zeros(n, dtype=bool)
    for start, stop, _ in shards:
        done[start:min(stop, n)] = True
    out, i = [], 0
    while i < n:
        if done[i]:
            i += 1
            continue
        j = i
        while j < n and not done[j] and j - i < batch:
            j += 1
        out.append((i, j))
        i = j
    return out


def sample_batches(directory: Path, n: int, batch: int):
    """Batches of (uint8 images (B, 3, H, W), labels (B,) or None) of samples 0..n-1, shard by shard.

    One shard is in memory at a time, so 50k ImageNet samples need no 10 GB array.
    """
    covered = 0
    for start, stop, path in existing_shards(directory):
        if stop <= covered or start >= n:
            continue  # a shard of samples already read (shards of two batch sizes may overlap)
        if start > covered:
            break
        try:
            with np.load(path, allow_pickle=False) as f:
                take = slice(covered - start, min(stop, n) - start)
                images = f["images"][take]
                labels = f["labels"][take] if "labels" in f.files else None
        except NPZ_ERRORS as err:
            raise UserError(f"cannot read sample shard {path}: {unreadable_npz(err, path)}",
                            suggestion="delete it and run zoo eval again to sample it again") from None
        if len(images) != min(stop, n) - covered:  # its name claims indices it lacks: a rerun would trust the name
            raise UserError(f"sample shard {path} holds {covered - start + len(images)} images, its name says "
                            f"{stop - start}", suggestion="delete it and run zoo eval again to sample it again")
        covered += len(images)
        yield from array_batches(images, labels, batch)
    if covered < n:
        raise UserError(f"{directory} lacks samples from index {covered} on; run zoo eval again to sample them")


def evaluate(request: EvalRequest, log: Callable[[str], None] = print, progress: bool = True) -> dict | None:
    """Sample (or resume), extract, score; write the JSON result and return it.

    Under ``torchrun`` each process samples every N-th missing shard on its own GPU, then rank 0
    extracts the features and scores while the others return ``None``: the samples and the result
    are those of one process (each sample has its own seeds).
    """
    from zoo.guards import check_writable
    from zoo.training import distributed

    from zoo.sample import sample_recipe

    with reported_by_rank_0():  # before the ranks can compare notes: each would print the same mistake
        ckpt, eval_dir = locate(request.source)
        given = request.n
        recipe = sample_recipe(ckpt, request.overrides, request.solver)  # reads no weights
        request = _with_recipe_defaults(request, recipe, ckpt)
        if request.n < 2:
            raise UserError(f"{'--n' if given is not None else 'sample.num_samples'} must be at least 2 (a "
                            f"covariance needs two samples), got {request.n}")
        eval_dir = Path(request.out).expanduser() if request.out else eval_dir
        device = torch.device(request.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        distributed.check_launch(device)
    ctx = distributed.init(str(device))
    if not ctx.main:
        log, progress = (lambda _: None), False
    with distributed.agreement(ctx):  # a mistake on any rank: one line from rank 0, every rank stops
        if ctx.main:  # an eval directory no file can be made in: said now, not after a batch is sampled
            check_writable(eval_dir, "--out" if request.out else "eval directory", into=True,
                           suggestion=None if request.out else "give --out DIR elsewhere")
        setup = _set_up(request, recipe, ckpt, eval_dir, ctx.device, log, main=ctx.main)
    with distributed.agreement(ctx):  # every process samples the weights rank 0 hashed
        if ctx.broadcast(setup.protocol["weights_sha256"]) != setup.protocol["weights_sha256"]:
            raise UserError(f"checkpoint {ckpt} was replaced by a newer save while the processes read it "
                            "(a running zoo train saving there)",
                            suggestion="evaluate one of the run's step_* checkpoints, or wait for the run to end")
    upto = request.n
    if setup.solver.batch_coupled:  # whole batches only: a later, larger --n then finds the batches a fresh run
        upto = -(-request.n // setup.batch) * setup.batch  # samples, not a short last batch of other batch-mates
    todo = ctx.broadcast(missing_ranges(upto, existing_shards(setup.samples_dir), setup.batch) if ctx.main else None)
    done = upto - sum(b - a for a, b in todo)
    shared = f"; {ctx.world} processes share the rest" if ctx.distributed and todo else ""
    log(f"zoo eval: {setup.origin}; {request.n} samples in {setup.samples_dir} ({done} already there{shared}); "
        f"solver {setup.protocol['solver']}; {setup.guidance.describe()}"
        + ("; classes drawn balanced (sample i: class i mod K)" if setup.protocol.get("labels") == "balanced" else ""))
    mine = todo[ctx.rank::ctx.world]
    with distributed.agreement(ctx):  # non-finite samples on one rank: one line from rank 0, every rank stops
        if mine:
            from tqdm import tqdm

            with tqdm(total=sum(b - a for a, b in mine), unit="img", desc="sampling" + (" (rank 0)" if shared else ""),
                      disable=None if progress else True) as bar:  # None: no bar where stderr is not a terminal
                for start, stop in mine:
                    images, labels = _sample_range(setup.model, setup.recipe, setup.solver, setup.schedule,
                                                   setup.guidance, start, stop, request.seed, ctx.device,
                                                   setup.decoder, setup.precision)
                    extra = {} if labels is None else {"labels": labels.numpy()}
                    setup.samples_dir.mkdir(parents=True, exist_ok=True)  # not before a first shard to put there
                    save_npz(setup.samples_dir / f"shard-{start:07d}-{stop:07d}.npz",
                             images=images.permute(0, 2, 3, 1).numpy(), indices=np.arange(start, stop), **extra)
                    bar.update(stop - start)
    ctx.barrier()  # every rank's shards are written
    if not ctx.main:
        return None
    return _score(request, setup, ckpt, eval_dir, ctx.device)


def _with_recipe_defaults(request: EvalRequest, recipe: dict, ckpt: Path) -> EvalRequest:
    """``request`` with an unset ``n`` and ``seed`` taken from ``ckpt``'s ``recipe`` (``sample.num_samples``
    and ``sample.seed``, the seed defaulting to 0); no sample count anywhere is a mistake."""
    from zoo.seeds import recipe_seed

    n = request.n if request.n is not None else (recipe.get("sample") or {}).get("num_samples")
    if n is None:
        raise UserError(f"how many samples to score? {ckpt}'s recipe has no sample.num_samples",
                        suggestion="give --n (--num-samples under torchrun), e.g. --n 50000 for the papers' FID-50K")
    return replace(request, n=n, seed=recipe_seed(recipe, request.seed))


@dataclass
class _Setup:
    """What :func:`evaluate` builds before sampling (``extractor`` and ``reference`` on rank 0 only)."""

    model: torch.nn.Module
    recipe: dict
    origin: str
    decoder: torch.nn.Module | None
    schedule: Any
    solver: Any
    guidance: Any
    precision: str | None
    protocol: dict
    key: str
    samples_dir: Path
    batch: int
    ref_spec: str
    extractor: Any = None
    reference: Any = None


def _set_up(request: EvalRequest, recipe: dict, ckpt: Path, eval_dir: Path, device: torch.device,
            log: Callable[[str], None], main: bool = True) -> _Setup:
    """Model, solver, protocol and sample directory for ``ckpt`` sampled with ``recipe`` (its
    :func:`zoo.sample.sample_recipe`); on the main process also the extractor and the reference
    statistics, so a wrong ``--ref`` or missing extractor weights fail before any sampling."""
    from zoo.checkpoint import EMA
    from zoo.diffusion.setup import build_schedule, guidance_settings
    from zoo.eval.extractors import build_extractor, require_rgb_samples
    from zoo.precision import arithmetic_key
    from zoo.sample import (build_solver, check_before_weights, load_decoder, num_classes,
                            sampling_precision, vae_weights)
    from zoo.seeds import label_draw
    from zoo.vae import SCALE, vae_downsample

    if request.weights not in ("ema", "raw"):
        raise UserError(f"--weights must be ema or raw, not {request.weights!r}")
    # A missing --ref or a --set that cannot apply is said before the extractor (timm, torchvision: seconds
    # to import) and the model load.
    check_before_weights(recipe, request.solver, request.steps, request.respacing, request.precision, None,
                         request.solver_options)  # a respacing or precision sampling would refuse: said now
    ref_spec = _said_in_full(request.ref) if request.ref else _default_ref(recipe)
    extractor = build_extractor(request.extractor, request.extractor_weights, device) if main else None
    model, origin, weights_file, weights_sha256 = _hashed_model(request, recipe, ckpt, device)
    decoder = load_decoder(recipe, request.vae, device)  # a latent model's VAE, loaded once: bad weights fail here
    schedule = build_schedule(recipe)
    solver, solver_spec = build_solver(recipe, request.solver, request.steps, request.solver_options,
                                       request.respacing)
    guidance = guidance_settings(recipe, request.cfg)
    vae_file = vae_weights(recipe, request.vae) if decoder is not None else None  # the images are the VAE's
    x_example = example_inputs(model)[0]
    channels, image_size = int(x_example.shape[1]), int(x_example.shape[-1]) * (vae_downsample(vae_file) if vae_file
                                                                               else 1)
    if decoder is None:  # the extractors take RGB: else a traceback after all the sampling
        require_rgb_samples(channels, image_size, "zoo eval", "evaluate a model of 3-channel images; a latent "
                            "model's samples are decoded to RGB by its VAE (data.latent: true, --vae)")
    protocol = {
        "checkpoint": str(ckpt.resolve()), "weights": "ema" if weights_file.name == EMA else "raw",
        "weights_sha256": weights_sha256, "solver": solver_spec,
        # guidance that changes nothing (w = 1) is the unguided protocol: the same images, not sampled again
        # numbers as floats: --cfg 2 (a float) and --set sample.cfg.scale=2 (a YAML int) sample alike
        "cfg": ({"scale": float(guidance.scale), "convention": guidance.convention, "w": float(guidance.w),
                 "channels": guidance.channels, "power": None if guidance.power is None else float(guidance.power)}
                if guidance.active else
                {"scale": None, "convention": "dit", "w": None, "channels": None, "power": None}),
        # zoo.seeds.sample_seed, under the name every saved protocol records and zoo.sample still exports
        # (renaming it would rename the samples folders of finished and half-done evaluations)
        "seed": request.seed, "seeds": "zoo.sample.sample_seed(seed, index, stream): noise 0, label 1, solver 2",
        "num_classes": num_classes(recipe), "image_size": image_size, "dtype": str(next(model.parameters()).dtype),
        # what the weights mean: the same file sampled under another schedule, prediction, time input or
        # null label gives other images
        "model": recipe.get("model"), "diffusion": recipe.get("diffusion"),
    }
    batch = eval_batch_size(recipe, request.batch_size)
    draw = label_draw(recipe)
    if num_classes(recipe) is not None and draw != "random":  # other labels, other samples; no key for
        protocol["labels"] = draw  # random ones, so earlier protocols and samples stay valid
    if solver.batch_coupled:  # adaptive steps: an image depends on its batch-mates, so samples of another
        protocol["batch_size"] = batch  # batch size are other samples (kept apart, never mixed on a resume)
    precision = sampling_precision(recipe, request.precision, next(model.parameters()).dtype)
    computed = arithmetic_key(precision, device)
    if computed is not None:  # other arithmetic, other samples (no key for exact float32: earlier samples stay valid)
        protocol["precision"] = computed
    if vae_file is not None:  # other VAE weights or scale, other samples
        protocol["vae"] = {"weights_sha256": _sha256(vae_file),
                           "scale": float((recipe.get("data") or {}).get("vae_scale", SCALE))}
    if request.overrides:  # recorded; what they change is keyed above by its resolved value (solver, cfg, ...)
        protocol["overrides"] = list(request.overrides)
    # the weights' sha256 names the checkpoint; overrides are keyed by what they resolve to, so spelling one
    # option two ways (or setting a training-only key) does not sample again
    identity = {k: v for k, v in protocol.items() if k not in ("checkpoint", "overrides")}
    identity["solver"] = _resolved_solver(solver_spec)  # the spec as written stays in the record
    key = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:10]
    reference = (load_reference(ref_spec, extractor, image_size, request.batch_size or 32, device, log,  # before sampling
                                recipe=recipe) if main else None)
    return _Setup(model, recipe, origin, decoder, schedule, solver, guidance, precision, protocol, key,
                  eval_dir / f"samples-{ckpt.name}-{key}", batch, ref_spec, extractor, reference)


def _score(request: EvalRequest, setup: _Setup, ckpt: Path, eval_dir: Path, device: torch.device) -> dict:
    """Features of the samples on disk, the metrics against the reference, the JSON result written."""
    from zoo.checkpoint import read_classes, versions
    from zoo.eval.reference import statistics_key
    from zoo.sample import num_classes

    feats = extract(setup.extractor, sample_batches(setup.samples_dir, request.n, setup.batch), device)
    metrics = compute_metrics(feats, setup.reference, num_classes=num_classes(setup.recipe),
                              class_names=read_classes(ckpt) or None)
    reference = setup.reference
    result = {"metrics": metrics, "n": request.n, "protocol": setup.protocol, "samples": str(setup.samples_dir),
              "extractor": setup.extractor.describe(), "reference": {"spec": setup.ref_spec, "source": reference.source,
                                                                     "count": None if reference.features is None
                                                                     else int(len(reference.features)),
                                                                     "image_decoding": IMAGE_DECODING,
                                                                     "statistics": statistics_key(
                                                                         setup.ref_spec, setup.protocol["image_size"],
                                                                         setup.extractor.describe(), setup.recipe)},
              "zoo_version": versions()["zoo"], "versions": versions(), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                             time.gmtime())}
    out = eval_dir / result_name(ckpt.name, setup.extractor.name, request.n, setup.key, _reference_key(setup.ref_spec),
                                 _extractor_key(setup.extractor))
    kept = _earlier_distortion(out, result)
    if kept is not None:  # the same samples: a run without --distortion keeps the earlier classifier's count
        result["distortion"] = kept
    save_text(out, json.dumps(result, indent=2) + "\n")
    result["path"] = str(out)
    return result


def _earlier_distortion(path: Path, result: dict) -> dict | None:
    """The ``distortion`` section of the result already at ``path`` if it scored the same samples (same
    directory and count) as ``result``; ``None`` otherwise, or where that file cannot be read."""
    try:
        earlier = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(earlier, dict) or not isinstance(earlier.get("distortion"), dict):
        return None
    same = earlier.get("samples") == result["samples"] and earlier.get("n") == result["n"]
    return earlier["distortion"] if same else None


#: What :func:`result_name` writes: CHECKPOINT-EXTRACTOR[~IDENTITY]-nN-PROTOCOL-refREFERENCE.json.
RESULT_NAME = re.compile(r"(?P<checkpoint>.+)-(?P<extractor>.+?)(?:~(?P<extractor_key>[0-9a-f]+))?-n(?P<n>\d+)"
                         r"-(?P<key>[0-9a-f]+)-ref(?P<ref>[0-9a-f]+)\.json")


def result_name(checkpoint: str, extractor: str, n: int, key: str, ref_key: str,
                extractor_key: str | None = None) -> str:
    """The file name of one eval result (matched by :data:`RESULT_NAME`); ``extractor_key``: see
    :func:`_extractor_key`."""
    identity = f"~{extractor_key}" if extractor_key else ""
    return f"{checkpoint}-{extractor}{identity}-n{n}-{key}-ref{ref_key}.json"


def _extractor_key(extractor) -> str | None:
    """A short hash of the extractor's identity (weights' sha256, plugin version) for a result's name, so
    evals with two weights files of one extractor keep both results (the second overwrote the first);
    None where the name alone says it (a built-in's pinned weights, an extractor without weights), so
    those results keep their names."""
    from zoo.eval.extractors import extractor_identity

    identity = extractor_identity(extractor.describe())
    if identity == {"name": extractor.name, "weights_sha256": extractor.pinned_sha256}:
        return None
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:6]


def eval_batch_size(recipe: Mapping[str, Any], given: int | None = None) -> int:
    """Samples per batch of an evaluation: ``given`` (``--batch-size``), else the recipe's ``sample.batch_size``,
    else 32. An adaptive solver's samples depend on it, so zoo eval, train.eval_every and zoo compare read it here."""
    return int(given or (recipe.get("sample") or {}).get("batch_size") or 32)


def results_of_weights(ckpt: Path, eval_dir: Path) -> list[tuple[Path, dict]]:
    """(path, result) of the ``zoo eval`` results in ``eval_dir`` whose recorded weights are ``ckpt``'s current
    ones (``protocol.weights_sha256`` that of its EMA or raw weights file, as ``protocol.weights`` says): a
    result of another checkpoint's weights, or of an earlier save of this one, is not of these weights."""
    from zoo.checkpoint import EMA, MODEL

    hashes: dict[str, str | None] = {}
    found = []
    for path in sorted(eval_dir.glob("*.json")) if eval_dir.is_dir() else []:
        if not RESULT_NAME.fullmatch(path.name):
            continue
        try:
            result = json.loads(path.read_text())
            protocol = result["protocol"]
            file, sha = {"ema": EMA, "raw": MODEL}.get(protocol["weights"]), protocol["weights_sha256"]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):  # not a result zoo eval wrote
            continue
        if file is None:
            continue
        if file not in hashes:
            hashes[file] = _sha256(ckpt / file) if (ckpt / file).is_file() else None
        if hashes[file] is not None and hashes[file] == sha:
            found.append((path, result))
    return found


def _reference_key(spec: str) -> str:
    """A short name for ``--ref`` in a result's file name: one checkpoint scored against two
    references keeps both results."""
    from zoo.eval.reference import reference_name

    return hashlib.sha256(reference_name(spec).encode("utf-8", "surrogateescape")).hexdigest()[:6]


def _resolved_solver(spec: dict) -> dict:
    """The solver settings as they sample, for the samples' key: its defaults filled in and numbers as
    floats, so ``eta: 0``, ``eta: 0.0`` and no ``eta`` at all key the same samples (each had sampled
    everything again)."""
    from zoo import registry
    from zoo.recipe_diff import recipe_defaults

    full = {**recipe_defaults(registry.get("solver", spec["type"])), **spec}
    return {k: float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v for k, v in full.items()}


def _default_ref(recipe: dict) -> str:
    from zoo.training.data import gives_latents

    data = recipe.get("data") or {}
    name = data_setting(data, "dataset")
    if name == "synthetic" and not gives_latents(data):  # the run's own synthetic images, made from its recipe
        return name
    if name in ("synthetic", "image_folder", "latents", "imagenet"):
        raise UserError("--ref is needed: an .npz (ADM reference batch or zoo statistics), an image folder, "
                        "or a registered dataset name such as emoji32")
    return _said_in_full(name)


def _said_in_full(spec: str) -> str:
    """A dataset reference with the split it means (``emoji32`` is ``emoji32:holdout``), so the summary line
    and the result's JSON name one reference one way; a path, or anything else, as given."""
    from zoo import registry
    from zoo.eval.reference import dataset_reference

    if Path(spec).expanduser().exists() or spec.partition(":")[0] not in registry.names("dataset"):
        return spec
    name, split = dataset_reference(spec)
    return f"{name}:{split}" if split else name


def quick_fd(model, recipe: dict, n: int = 256, ref: str | None = None, extractor: Any = "efficientnet_lite0",
             seed: int | None = None, batch_size: int | None = None, device: str | torch.device | None = None,
             vae: str | None = None) -> float:
    """FD of ``n`` samples of ``model`` (pass the EMA copy) against ``ref`` (default: the recipe's dataset).

    For ``train.eval_every``: no shards, no files but the cached reference statistics. The
    recipe's ``sample`` section sets solver, guidance and batch size; ``extractor`` is a
    registered name or an extractor built once by the caller (cheaper when called often).
    ``seed``: the per-sample seeds, by default the recipe's ``sample.seed`` (as zoo eval draws them).
    The model's train/eval mode is restored.
    """
    from zoo.diffusion.setup import build_schedule, guidance_settings
    from zoo.eval.extractors import build_extractor
    from zoo.eval.stats import feature_statistics, frechet_distance
    from zoo.modes import evaluating
    from zoo.sample import build_solver, load_decoder, sampling_precision
    from zoo.seeds import recipe_seed

    seed = recipe_seed(recipe, seed)
    device = device or next(model.parameters()).device
    if isinstance(extractor, str):
        extractor = build_extractor(extractor, device=device)
    schedule, guidance = build_schedule(recipe), guidance_settings(recipe)
    solver, _ = build_solver(recipe, None, None)
    batch = eval_batch_size(recipe, batch_size)
    with evaluating(model), torch.no_grad():
        decoder = load_decoder(recipe, vae, device)
        precision = sampling_precision(recipe, None, next(model.parameters()).dtype)
        chunks = [_sample_range(model, recipe, solver, schedule, guidance, a, min(a + batch, n), seed, device,
                                decoder, precision) for a in range(0, n, batch)]
    image_size = chunks[0][0].shape[-1]
    feats = extract(extractor, ((images, None) for images, _ in chunks), device)
    reference = load_reference(ref or _default_ref(recipe), extractor, image_size, batch, device, log=lambda _: None,
                               recipe=recipe)
    return frechet_distance(*feature_statistics(feats.features), reference.mu, reference.sigma)
