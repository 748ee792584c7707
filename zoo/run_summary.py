"""What a trained run reached, read from what it wrote: for ``zoo compare RUN...``.

A run directory (``zoo train --out``) is compared at its ``last/`` checkpoint, a checkpoint
directory (``RUN/step_0005000``, a converted or exported one) as it is. The figures come from the
run's own records, nothing is recomputed:

* ``step``: the checkpoint's training step (its trainer state's; without one, N of ``step_N``, else the
  newest step log.jsonl records).
* ``loss``: the mean training loss over the last 10% of the steps up to ``step`` (at least the last
  ``train.log_every`` steps), each log record weighed by the steps it covers (a record is the mean over
  the steps since the one before it).
* ``val_loss``: the ``train.val_every`` record of the last ``val_every`` steps up to ``step`` (the same
  fixed draws every time).
* ``fd``: a ``zoo eval`` result of exactly these weights (its recorded sha256 must be that of the
  checkpoint's weights file, whichever checkpoint it was run on; of several, EMA before raw weights,
  then the most samples, then the newest), else the ``train.eval_every`` record of the last
  ``eval_every`` steps up to ``step`` (EMA weights, the recipe's sampler). Its sample count, extractor, reference,
  weights, sampler (with its precision, labels and batch size), classes and VAE come with it: FDs measured
  otherwise are not comparable.

Records older than those windows are not taken, nor a log that stops short of the checkpoint's step:
after a resume from an older ``step_*`` the log holds the new branch only, and the abandoned branch's
later checkpoints have no records of their own (once the new branch has logged past their step, its
records are taken for theirs: the log does not say which branch a step was trained in).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

from zoo.checkpoint import CONFIG, MODEL, STEP_NAME, checkpoint_of, newest_step_hint, read_config, run_of
from zoo.domains import is_int, is_number
from zoo.errors import UserError
from zoo.recipe import shadowed_recipe_hint
from zoo.training.crop import IMAGE_DECODING
from zoo.training.sections import data_setting

LOSS_WINDOW = 0.1  # the share of a run's last steps whose logged losses are averaged
LOSS_SETTINGS = ("objective", "prediction", "min_snr_gamma", "time_sampling", "schedule")  # what a loss is of
OLDER_READING = "images read as before 2026-12-07"  # an FD of a zoo that read a folder's transparency otherwise


@dataclass
class RunSummary:
    """One checkpoint's training figures; ``None`` where the run did not record one."""

    checkpoint: str
    step: int | None = None
    loss: float | None = None
    val_loss: float | None = None
    fd: float | None = None
    fd_n: int | None = None
    fd_extractor: str | None = None
    fd_reference: str | None = None  # as zoo eval's --ref was given, or what train.eval_every compared with
    fd_reference_key: str | None = None  # which reference statistics: "statistics" and their key, else older keys
    fd_reference_aliases: list[str] = field(default_factory=list)  # the same statistics' older key (a run's FDs
    # logged before they carried the shared key compare with this one's under it)
    fd_weights: str | None = None  # "ema" or "raw"
    fd_sampler: str | None = None  # the solver with its settings, the guidance, and precision, labels, batch size
    fd_classes: int | None = None  # the classes the labels were drawn from (None: unconditional)
    fd_vae: dict[str, Any] | None = None  # the decoding VAE's weights_sha256 and scale (None: pixels, or unknown)
    fd_source: str | None = None
    loss_settings: dict[str, Any] | None = None  # the diffusion settings its losses were computed under

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def is_run_or_checkpoint(arg: str | Path) -> bool:
    """Whether a command-line argument names a directory (a run or a checkpoint), not a recipe: also a
    ``RUN/step_N`` that a live run's ``train.keep_last`` deleted after the shell listed it."""
    path = Path(arg).expanduser()
    return path.is_dir() or bool(STEP_NAME.fullmatch(path.name) and (path.parent / "log.jsonl").is_file())


def checkpoint_dir(arg: str | Path) -> Path:
    """The checkpoint a directory argument is compared at: a run's ``last/``, or the checkpoint itself."""
    given = Path(arg).expanduser()
    if not given.exists():
        hint = newest_step_hint(given.parent)
        raise UserError(f"checkpoint {arg} does not exist", suggestion="a running zoo train deletes its older "
                        "step_* checkpoints (train.keep_last)" + (f"; {hint}" if hint else ""))
    path = checkpoint_of(given)
    if not (path / CONFIG).is_file():
        runs = sorted(d.name for d in given.iterdir() if d.is_dir() and (d / "last" / CONFIG).is_file())
        raise UserError(f"{arg} is a directory, but neither a zoo train run (with last/) nor a checkpoint "
                        f"({CONFIG}, {MODEL})",
                        suggestion=newest_step_hint(given)
                        or (f"it holds the runs {', '.join(runs[:5])}{', ...' * (len(runs) > 5)}: pass them, "
                            f"e.g. {given / '*'}/" if runs else None)
                        or shadowed_recipe_hint(given)  # ./emoji32/dit/ beside the shipped emoji32/dit
                        or "give a recipe's .yaml file, a run directory or a checkpoint directory")
    return path


def _finite(value: Any) -> bool:
    return is_number(value) and math.isfinite(value)


def _records(run: Path | None) -> list[dict]:
    from zoo.training.monitor import read_log

    return [] if run is None else read_log(run / "log.jsonl")


def _train_section(stored: dict) -> dict[str, Any]:
    """A checkpoint recipe's ``train`` section with zoo train's defaults (its log, val and eval periods)."""
    from zoo.training.sections import TRAIN_DEFAULTS

    train = stored.get("train")
    return {**TRAIN_DEFAULTS, **(train if isinstance(train, dict) else {})}


def _mean_loss(records: list[dict], lower: int, upper: int) -> float | None:
    """The mean training loss over steps (lower, upper]: each record is the mean of the steps since the record
    before it, so it weighs as many steps as it covers in the window (a run stopped and resumed logs one
    more, shorter record there, and a plain mean of the records differed from the uninterrupted run's)."""
    total = steps = 0.0
    previous = 0
    for record in records:
        if "loss" not in record or record["step"] > upper:
            continue
        covered = record["step"] - max(previous, lower)
        if covered > 0 and _finite(record["loss"]):
            total, steps = total + record["loss"] * covered, steps + covered
        previous = record["step"]
    return total / steps if steps else None


def _newest_within(records: list[dict], key: str, step: int, period: Any) -> dict | None:
    """The newest record with a finite ``key`` in the last ``period`` steps up to ``step``."""
    period = period if is_int(period) and period > 0 else 1
    found = [r for r in records if step - period < r["step"] <= step and _finite(r.get(key))]
    return found[-1] if found else None


def loss_settings(stored: dict) -> dict[str, Any]:
    """The diffusion settings a training (and validation) loss depends on, defaults filled in: losses of
    runs that differ in one are not comparable (DiMR's multiscale sum is ~2x an ε-MSE at equal quality)."""
    from zoo.diffusion.sections import DIFFUSION_DEFAULTS, with_component_defaults

    diffusion = stored.get("diffusion")
    diffusion = diffusion if isinstance(diffusion, dict) else {}
    # a name is its {type: name, every key at its default}
    return with_component_defaults({key: diffusion.get(key, DIFFUSION_DEFAULTS[key]) for key in LOSS_SETTINGS})


def _well_formed_fd(record: dict) -> bool:
    """Whether an FD record's fields have the types train.eval_every writes (a hand's edit is skipped)."""
    return (all(isinstance(record.get(k), (str, type(None)))
                for k in ("fd_ref", "fd_ref_key", "fd_statistics", "fd_extractor"))
            and (record.get("fd_n") is None or (is_int(record["fd_n"]) and record["fd_n"] > 0)))


def _step_of(ckpt: Path, logged: int | None) -> int | None:
    """The checkpoint's step: its trainer state's (a run killed after its last save logged steps past it),
    else its ``step_N`` name, else ``logged``, the newest step the log records."""
    from zoo.checkpoint import trained_step

    step = trained_step(ckpt)
    if step is None and STEP_NAME.fullmatch(ckpt.name):
        step = int(ckpt.name.removeprefix("step_"))
    return logged if step is None else step


def sampler_text(solver: Mapping[str, Any], cfg: Mapping[str, Any] | None,
                 protocol: Mapping[str, Any] | None = None) -> str:
    """``solver`` (a solver spec) with its defaults filled in, the guidance weight, and the ``protocol`` keys
    zoo eval adds where they are not the default (``precision``, ``labels``, an adaptive solver's
    ``batch_size``): one text that is equal for two FDs exactly when they were sampled alike
    (``"ddim clip_denoised=False eta=0 steps=5, no guidance"``, ``"..., no guidance, bf16, balanced labels"``)."""
    from zoo.eval.runner import _resolved_solver

    try:
        full = _resolved_solver(dict(solver))
    except UserError:  # a solver this process has not registered (a notebook's): its settings as recorded
        full = dict(solver)
    settings = " ".join(f"{k}={full[k]:g}" if isinstance(full[k], float) else f"{k}={full[k]}"
                        for k in sorted(full) if k != "type" and full[k] is not None)
    w = (cfg or {}).get("w")
    guidance = "no guidance" if w is None else f"cfg w={float(w):g}" + "".join(
        f" {k}={cfg[k]}" for k in ("channels", "power") if cfg.get(k) is not None)
    protocol = protocol or {}
    extra = [f"{protocol['precision']}" if protocol.get("precision") is not None else "",
             f"{protocol['labels']} labels" if protocol.get("labels") is not None else "",
             f"batch {protocol['batch_size']}" if protocol.get("batch_size") is not None else ""]
    return f"{full['type']} {settings}".strip() + f", {guidance}" + "".join(f", {e}" for e in extra if e)


def _recipe_sampler(ckpt: Path) -> tuple[str | None, int | None]:
    """The sampler ``train.eval_every`` used (the checkpoint recipe's ``sample`` section, as zoo eval reads it)
    and the classes it drew labels from. Its precision is the recipe's ``sample.precision`` where that is
    bf16 or fp16 (the log does not record the device, so TF32 cannot be told from float32)."""
    from zoo.checkpoint import load_recipe_of
    from zoo.diffusion.setup import guidance_settings
    from zoo.eval.runner import eval_batch_size
    from zoo.sample import build_solver, num_classes
    from zoo.seeds import label_draw

    try:
        recipe = load_recipe_of(ckpt)
        solver, spec = build_solver(recipe, None, None)
        guidance = guidance_settings(recipe)
        classes = num_classes(recipe)
    except UserError:  # a recipe this zoo cannot sample: its FD says no more than its numbers
        return None, None
    sample, draw = recipe.get("sample") or {}, label_draw(recipe)
    protocol = {"precision": sample.get("precision") if sample.get("precision") in ("bf16", "fp16") else None,
                "labels": draw if classes is not None and draw != "random" else None,
                "batch_size": eval_batch_size(recipe) if solver.batch_coupled else None}  # as quick_fd
    return sampler_text(spec, {"w": guidance.w, "channels": guidance.channels, "power": guidance.power}
                        if guidance.active else None, protocol), classes


def _eval_results(ckpt: Path, eval_dir: Path) -> list[dict]:
    """The ``zoo eval`` results in ``eval_dir`` of ``ckpt``'s current weights (their sha256 checked) with an FD."""
    from zoo.eval.runner import RESULT_NAME, results_of_weights

    found = []
    for path, result in results_of_weights(ckpt, eval_dir):
        try:
            protocol, metrics = result["protocol"], result["metrics"]
            fd = metrics["fd"]
            cfg = protocol.get("cfg") or {}
            if not (isinstance(protocol["solver"], dict)
                    and isinstance(protocol["solver"].get("type"), str) and isinstance(cfg, dict)
                    and (cfg.get("w") is None or _finite(cfg["w"])) and is_int(result.get("n"))
                    and isinstance(result.get("extractor") or {}, dict)
                    and isinstance(result.get("reference") or {}, dict)
                    and all(isinstance(protocol.get(k), (str, type(None))) for k in ("precision", "labels"))
                    and all(protocol.get(k) is None or is_int(protocol[k]) for k in ("num_classes", "batch_size"))
                    and isinstance(protocol.get("vae"), (dict, type(None)))):
                continue
        except (KeyError, TypeError, AttributeError):  # not a result zoo eval wrote
            continue
        if _finite(fd):
            found.append({**result, "_reference_key": RESULT_NAME.fullmatch(path.name)["ref"], "_path": path})
    return found


def summarize(arg: str | Path) -> RunSummary:
    """The figures a run (its ``last/``) or a checkpoint directory recorded; see the module docstring."""
    from zoo.eval.runner import locate

    given = checkpoint_dir(arg)
    ckpt, eval_dir = locate(Path(os.path.realpath(given)))  # a link to RUN/step_N: its run's log and results
    run = run_of(ckpt)
    records = _records(run)
    logged = max((r["step"] for r in records if "loss" in r), default=None)
    step = _step_of(ckpt, logged)
    summary = RunSummary(checkpoint=str(given), step=step)
    stored = read_config(ckpt)
    train = _train_section(stored)
    # A log that stops short of the step is another branch's (a resume from an older step_* rewrote it):
    # none of its records describe this checkpoint.
    if step is not None and (logged is None or logged < step):
        records = []
    if step is not None:
        log_every = train["log_every"] if is_int(train["log_every"]) else 1
        summary.loss = _mean_loss(records, min(math.floor(step * (1 - LOSS_WINDOW)), step - max(log_every, 1)), step)
        val = _newest_within(records, "val_loss", step, train.get("val_every"))
        summary.val_loss = float(val["val_loss"]) if val else None
        summary.loss_settings = loss_settings(stored)
    results = _eval_results(ckpt, eval_dir)
    if results:
        best = max(results, key=lambda r: (r["protocol"]["weights"] == "ema", r["n"], str(r.get("time") or "")))
        reference, protocol = best.get("reference") or {}, best["protocol"]
        summary.fd, summary.fd_n = float(best["metrics"]["fd"]), best["n"]
        summary.fd_extractor = (best.get("extractor") or {}).get("name")
        summary.fd_reference, summary.fd_reference_key = reference.get("spec"), best["_reference_key"]
        if isinstance(reference.get("statistics"), str):  # the key train.eval_every's records carry too
            summary.fd_reference_key = f"statistics {reference['statistics']}"
        if reference.get("image_decoding") != IMAGE_DECODING:  # images (of a folder) may have been read otherwise
            summary.fd_reference_key += f", {OLDER_READING}"
        summary.fd_weights = protocol["weights"]
        summary.fd_sampler = sampler_text(protocol["solver"], protocol.get("cfg"), protocol)
        summary.fd_classes, summary.fd_vae = protocol.get("num_classes"), protocol.get("vae")
        summary.fd_source = str(best["_path"])
        return summary
    fds = [r for r in records if _well_formed_fd(r)]
    rec = _newest_within(fds, "fd", step, train.get("eval_every")) if step is not None else None
    if rec:
        summary.fd, summary.fd_n, summary.fd_extractor = float(rec["fd"]), rec.get("fd_n"), rec.get("fd_extractor")
        summary.fd_reference = rec.get("fd_ref") or _eval_every_reference(stored)
        # records that name their reference came with today's image reading; older ones may have read it otherwise
        # (the statistics' hash, where recorded, tells two folders or subsets of one description apart)
        summary.fd_reference_key = (f"statistics {rec['fd_statistics']}" if rec.get("fd_statistics") else
                                    f"statistics {rec['fd_ref_key']}" if rec.get("fd_ref_key")
                                    else summary.fd_reference + ("" if rec.get("fd_ref") else f", {OLDER_READING}"))
        if rec.get("fd_statistics") and rec.get("fd_ref_key"):
            summary.fd_reference_aliases = [f"statistics {rec['fd_ref_key']}"]
        summary.fd_weights = "ema"
        summary.fd_sampler, summary.fd_classes = _recipe_sampler(ckpt)
        summary.fd_source = f"{run / 'log.jsonl'} (step {rec['step']})"
    return summary


def _eval_every_reference(stored: dict) -> str:
    """What ``train.eval_every`` compared with, for a log written before its records named it: the stored
    recipe's ``train.eval_ref``, else the run's own data (its holdout split where it has one)."""
    train, data = stored.get("train") or {}, stored.get("data") or {}
    if isinstance(train, dict) and train.get("eval_ref"):
        return str(train["eval_ref"])
    dataset = data_setting(data if isinstance(data, dict) else {}, "dataset")
    return f"{dataset} (the run's own data: its holdout split, else its training images)"
