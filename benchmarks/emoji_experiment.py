"""DiMR-2R, U-ViT and DiT side by side on emoji32: same step budget, same seeds, FD, precision/recall, distortion.

    python benchmarks/emoji_experiment.py                    # ~55 min on a quiet 2-core CPU (see the README)
    python benchmarks/emoji_experiment.py --steps 10000 --n 512 --out runs/emoji_long   # the demo's own budget
    python benchmarks/emoji_experiment.py --quick   # every stage at toy sizes (a test), into a new temporary directory

1. trains each model of ``recipes/emoji32/{dimr_2r,uvit,dit}.yaml`` (matched within 3% in
   parameters; the recipes' own seed and data; ``train.steps`` set, and ``PINNED``: the trunc-normal
   position init and the learning rate of 1e-3 the recorded results used) for ``--steps`` steps
   into ``OUT/runs/NAME``; a run already at that step is skipped, an interrupted one resumed;
2. trains the emoji32 classifier (``zoo train-classifier``) into ``OUT/classifier``, or reuses it.
   ``OUT/settings.json`` records what defines each run and the classifier (--quick, steps, batch,
   architecture, overrides); a rerun whose settings differ is refused rather than resuming or reusing them;
3. evaluates each model with ``zoo eval``'s code (EMA weights, the recorded results' sampler: DPM-Solver++
   20 steps, CFG 2; ``--n`` samples with per-sample seeds, shards reused on a rerun): FD of
   efficientnet_lite0 features (offline) against the emoji32 holdout split, precision/recall, and the
   distortion share (samples whose own-class probability under the classifier is below ``--threshold``);
4. writes ``OUT/results.md`` (the table, per-class distortion, the classifier's holdout accuracy),
   ``OUT/results.json``, and per model ``OUT/samples_NAME.png`` (the first 36 samples) and
   ``OUT/rejected_NAME.png`` (the rejected samples, lowest own-class probability first); prints the table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = {"DiMR-2R": "dimr_2r", "U-ViT/2": "uvit", "DiT/2": "dit"}
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "emoji_experiment"
SETTINGS = "settings.json"  # in OUT: what each run and the classifier were made with
QUICK_CLASSIFIER = {"dims": [8], "depths": [1]}
# Defaults measured 2026-12-03 on a quiet 2-core CPU: 55 min (training 19 / 14 / 11 min for DiMR-2R /
# U-ViT / DiT at batch 16, 256 samples each, classifier 1 min). 3000 steps, not fewer: under the recipes'
# cosine schedule + Min-SNR weights, 1500-step models still paint the whole frame and the classifier
# rejects 93-98% of every model's samples, which compares nothing.
STEPS, N, CLASSIFIER_STEPS, GRID = 3000, 256, 800, 36
# The settings the recorded results were measured with: the emoji32 recipes now start U-ViT's and
# DiMR's learned tables from the sin-cos positions (DiT's table is a fixed sin-cos one either way), and
# train at lr 3e-3 where the table's runs used 1e-3.
PINNED = {"dimr_2r": ["model.pos_embed_init=normal", "train.lr=1.0e-3"],
          "uvit": ["model.pos_embed_init=normal", "train.lr=1.0e-3"], "dit": ["train.lr=1.0e-3"]}


def _log(text: str) -> None:
    print(text, flush=True)


def finished_step(run: Path) -> int | None:
    """The step of ``run/last`` (None: no run there yet)."""
    from zoo.checkpoint import load_trainer_state

    return int(load_trainer_state(run / "last")["step"]) if (run / "last" / "config.json").is_file() else None


def run_recipe(recipe_file: Path, steps: int, overrides: list[str]) -> dict:
    """The recipe a run of ``steps`` steps trains with."""
    import zoo

    return zoo.load_recipe(str(recipe_file), [f"train.steps={steps}", "train.sample_every=0",
                                              f"train.ckpt_every={max(1, steps // 4)}", *overrides])


def run_settings(recipe_file: Path, steps: int, overrides: list[str], quick: bool) -> dict:
    """What defines a run's training: resuming or skipping a run made with other settings would mix them."""
    recipe = run_recipe(recipe_file, steps, overrides)
    return {"quick": quick, "steps": steps, "batch_size": recipe["train"].get("batch_size"),
            "recipe": recipe_file.relative_to(ROOT).as_posix(), "overrides": list(overrides),
            "model": json.loads(json.dumps(recipe["model"], default=str))}


def classifier_settings(steps: int, quick: bool) -> dict:
    """What defines the classifier: reusing one trained with other settings would score with it."""
    return {"quick": quick, "steps": steps, "arch": QUICK_CLASSIFIER if quick else "ConvNeXtClassifier defaults"}


def _show(value) -> str:
    return json.dumps(value) if isinstance(value, (dict, list)) else repr(value)


def check_settings(out: Path, wanted: dict[str, dict], present: set[str]) -> None:
    """Refuse when a run or the classifier already in ``out`` (``present``, keyed as in ``wanted``: runs/NAME,
    classifier) was made with other settings than ``wanted``, or with unrecorded ones."""
    from zoo.errors import UserError

    recorded = _read_settings(out)
    for key in wanted:
        if key not in present:
            continue
        then = recorded.get(key)
        if not isinstance(then, dict):
            raise UserError(f"--out {out}: {key} there has no recorded settings ({out / SETTINGS} lacks it), so it "
                            f"cannot be safely resumed or reused; give another --out (or delete {out / key})")
        found = _difference(then, wanted[key])
        if found:
            name, was, now = found
            raise UserError(f"--out {out}: {key} there was made with {name} {_show(was)}, this run asks for "
                            f"{_show(now)}; give another --out (or delete {out / key})")


def _difference(then, now, path: str = ""):
    """The first ``(dotted key, then, now)`` where two JSON values differ, or None."""
    if isinstance(then, dict) and isinstance(now, dict):
        for name in [*now, *(k for k in then if k not in now)]:
            found = _difference(then.get(name), now.get(name), f"{path}.{name}" if path else name)
            if found:
                return found
        return None
    return None if then == now else (path, then, now)


def _read_settings(out: Path) -> dict:
    from zoo.errors import UserError

    path = out / SETTINGS
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"--out {out}: {path} is unreadable ({err}); give another --out") from None
    if not isinstance(data, dict):
        raise UserError(f"--out {out}: {path} is not a settings record; give another --out")
    return data


def record_settings(out: Path, wanted: dict[str, dict]) -> None:
    """Write ``wanted`` into ``out/settings.json`` before anything is trained (an interrupted run resumes)."""
    from zoo.atomic import write_text

    write_text(out / SETTINGS, json.dumps({**_read_settings(out), **wanted}, indent=2) + "\n")


def train_model(recipe_file: Path, run: Path, steps: int, overrides: list[str], device: str | None) -> dict:
    """Train (or resume, or skip) one model; the time spent here and the step reached."""
    from zoo.training.loop import train

    done = finished_step(run)
    if done is not None and done >= steps:
        _log(f"{run.name}: finished at step {done}; skipped")
        return {"step": done, "seconds": None}
    recipe = run_recipe(recipe_file, steps, overrides)
    start = time.perf_counter()
    train(recipe, run, steps=steps, device=device, resume=run if done is not None else None,
          log=lambda line: _log(f"{run.name}: {line}"))
    return {"step": steps, "seconds": time.perf_counter() - start, "resumed_from": done}


def classifier(out: Path, steps: int, quick: bool, device: str | None) -> Path:
    """``out`` holding an emoji32 classifier trained for ``steps`` steps (reused when it is there)."""
    from zoo.classifier import read_classifier_config, save_classifier
    from zoo.classifier_train import load_data, train_classifier

    if (out / "config.json").is_file() and read_classifier_config(out)["train"]["steps"] == steps:
        _log(f"classifier: reusing {out}")  # its other settings were checked against OUT/settings.json
        return out
    arch = dict(QUICK_CLASSIFIER) if quick else None
    model, record = train_classifier(load_data("emoji32"), steps=steps, device=device or "cpu", arch=arch,
                                     log=lambda line: _log(line))
    save_classifier(out, model, {**record, "source": "emoji32"})
    _log(f"classifier: holdout accuracy {record['holdout_accuracy']:.4f} on {record['holdout_size']} images")
    return out


def evaluate_model(run: Path, n: int, scorer, threshold: float, solver_steps: int | None, device: str | None,
                   extractor: str = "efficientnet_lite0", extractor_weights: str | None = None) -> dict:
    from zoo.eval.distortion import analyse
    from zoo.eval.runner import EvalRequest, evaluate

    # The solver the recorded results were measured with (the recipes' grids now use DDPM 50).
    request = EvalRequest(source=str(run), n=n, ref="emoji32", extractor=extractor, extractor_weights=extractor_weights,
                          solver="dpm_solver++",
                          steps=solver_steps or 20, solver_options={"order": 2, "method": "multistep",
                                                                    "skip": "time_uniform"},
                          batch_size=36, device=device or "cpu")
    result = evaluate(request, log=lambda line: _log(f"{run.name}: {line}"), progress=False)
    return analyse(result, scorer, threshold, batch_size=64, device=device or "cpu",
                   log=lambda line: _log(f"{run.name}: {line}"))


def write_grids(result: dict, out: Path, name: str) -> dict:
    """``samples_NAME.png`` (the first samples) and ``rejected_NAME.png`` (a copy of the eval's grid) in ``out``."""
    from zoo.atomic import write_file
    from zoo.eval.runner import sample_batches
    from zoo.sample import save_grid

    images, _ = next(sample_batches(Path(result["samples"]), min(GRID, result["n"]), GRID))
    grids = {"samples": str(save_grid(images.float() / 255.0, out / f"samples_{name}.png"))}
    rejected = result["distortion"]["grid"]
    if rejected:
        grids["rejected"] = str(write_file(out / f"rejected_{name}.png", lambda tmp: shutil.copyfile(rejected, tmp)))
    return grids


def _fmt(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def real_distortion(scorer, threshold: float) -> dict:
    """The distortion share of the real emoji32 holdout images: what a generator matching the data would score."""
    import numpy as np

    from zoo.classifier_train import load_data
    from zoo.eval.distortion import distortion_share
    from zoo.eval.reference import to_uint8

    data = load_data("emoji32")
    probs = scorer(to_uint8(data.holdout_x)).numpy()
    labels = data.holdout_y.numpy()
    return distortion_share(probs[np.arange(len(labels)), labels], labels, threshold, scorer.num_classes)


def table(rows: list[dict], classes: list[str], real: dict | None = None) -> str:
    """The Markdown tables: one row per model (and the real holdout's distortion), then the share per class."""
    head = ("| model | params | steps | train s/step | FD (vs holdout) ↓ | precision ↑ | recall ↑ "
            "| distortion share ↓ | mean own-class p ↑ |\n|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        m, d = r["metrics"], r["distortion"]
        step_s = None if not r["train_seconds"] else r["train_seconds"] / r["trained_steps"]
        lines.append(f"| {r['model']} | {r['params']:,} | {r['step']} | {_fmt(step_s, 2)} | {_fmt(m['fd'], 2)} | "
                     f"{_fmt(m.get('precision'))} | {_fmt(m.get('recall'))} | {_fmt(d['share'])} "
                     f"({d['rejected']}/{d['n']}) | {_fmt(d['mean_own_probability'])} |")
    if real is not None:
        lines.append(f"| real holdout images | – | – | – | – | – | – | {_fmt(real['share'])} "
                     f"({real['rejected']}/{real['n']}) | {_fmt(real['mean_own_probability'])} |")
    columns = [(r["model"], r["distortion"]) for r in rows] + ([("real holdout", real)] if real else [])
    lines += ["", "| class | " + " | ".join(name for name, _ in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for c, label in enumerate(classes):
        cells = []
        for _, d in columns:
            pc = d["per_class"].get(str(c))
            cells.append("–" if pc is None else f"{pc['share']:.2f} ({pc['rejected']}/{pc['n']})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def output_dir(out: Path | None, quick: bool) -> Path:
    """``--out``, or its default: the recorded results' folder, or for --quick a new temporary directory (its
    toy numbers must not replace the recorded ones, nor its toy runs be resumed by a full run there)."""
    from zoo.errors import UserError

    if out is None and not quick:
        return DEFAULT_OUT
    if out is None:
        out = Path(tempfile.mkdtemp(prefix="emoji_experiment_quick_"))
        _log(f"--quick without --out: writing to {out}")
        return out
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a directory (new, or one this script wrote)")
    if quick and out.resolve() == DEFAULT_OUT.resolve():
        raise UserError(f"--out {out}: that folder holds the recorded results, which --quick's toy numbers would "
                        f"replace; give another --out, or none for a new temporary directory")
    return out


def main(argv: list[str] | None = None) -> int:
    from zoo.cli import positive_int

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None,
                   help=f"output directory (default {DEFAULT_OUT}; with --quick a new temporary directory)")
    p.add_argument("--steps", type=positive_int, default=None, help=f"training steps per model (default {STEPS})")
    p.add_argument("--n", type=positive_int, default=None, help=f"samples per model for the metrics (default {N})")
    p.add_argument("--classifier-steps", type=positive_int, default=None, help=f"default {CLASSIFIER_STEPS}")
    p.add_argument("--threshold", type=float, default=0.5, help="distortion: own-class probability below this")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--extractor", default="efficientnet_lite0", help="registered feature extractor for FD")
    p.add_argument("--extractor-weights", default=None, metavar="FILE",
                   help="the extractor's weights file (inception: pytorch-fid's pt_inception-2015-12-05-6726825d.pth)")
    p.add_argument("--quick", action="store_true", help="toy sizes (2 steps, 8 samples, 2 solver steps): a test")
    args = p.parse_args(argv)
    from zoo.errors import UserError
    from zoo.guards import resolve_device

    from zoo.eval.distortion import check_threshold
    from zoo.eval.extractors import build_extractor

    try:  # one device, threshold and extractor for every stage, checked before anything is trained
        args.device = str(resolve_device(args.device))
        check_threshold(args.threshold)
        build_extractor(args.extractor, args.extractor_weights)  # its weights file too: not after the training
    except UserError as err:
        p.error(str(err))
    quick = args.quick
    steps = args.steps or (2 if quick else STEPS)
    n = args.n or (8 if quick else N)
    cls_steps = args.classifier_steps or (2 if quick else CLASSIFIER_STEPS)
    overrides = ["train.batch_size=4", "train.log_every=1"] if quick else []

    import torch

    import zoo
    from zoo.checkpoint import read_config
    from zoo.eval.distortion import build_scorer
    from zoo.training.emoji import CATEGORIES

    out = output_dir(args.out, quick)
    recipes = {name: ROOT / "recipes" / "emoji32" / f"{name}.yaml" for name in MODELS.values()}
    wanted = {f"runs/{name}": run_settings(recipes[name], steps, [*PINNED.get(name, []), *overrides], quick)
              for name in MODELS.values()}
    wanted["classifier"] = classifier_settings(cls_steps, quick)
    present = {f"runs/{name}" for name in MODELS.values() if finished_step(out / "runs" / name) is not None}
    present |= {"classifier"} if (out / "classifier" / "config.json").is_file() else set()
    check_settings(out, wanted, present)  # before anything is trained: a mismatch is found in seconds
    out.mkdir(parents=True, exist_ok=True)
    record_settings(out, wanted)
    state_file = out / "results.json"
    previous = json.loads(state_file.read_text()) if state_file.is_file() else {}
    trained = {}
    for label, name in MODELS.items():  # all training first: the classifier and evals reuse nothing of it
        trained[label] = train_model(recipes[name], out / "runs" / name, steps,
                                     [*PINNED.get(name, []), *overrides], args.device)
    cls_dir = classifier(out / "classifier", cls_steps, quick, args.device)
    scorer = build_scorer(str(cls_dir), device=args.device or "cpu")
    real = real_distortion(scorer, args.threshold)
    rows = []
    for label, name in MODELS.items():
        run = out / "runs" / name
        result = evaluate_model(run, n, scorer, args.threshold, 2 if quick else None, args.device, args.extractor,
                                args.extractor_weights)
        with torch.device("meta"):
            params = sum(p.numel() for p in zoo.build_model(read_config(run / "last")).parameters())
        seconds = trained[label]["seconds"]
        old = (previous.get("models") or {}).get(label, {})
        if seconds is None:  # skipped: keep the time measured when it was trained
            seconds, trained_steps = old.get("train_seconds"), old.get("trained_steps")
        else:
            trained_steps = steps - (trained[label].get("resumed_from") or 0)
        rows.append({"model": label, "recipe": f"recipes/emoji32/{name}.yaml", "params": params,
                     "step": trained[label]["step"], "train_seconds": seconds, "trained_steps": trained_steps,
                     "metrics": result["metrics"], "distortion": result["distortion"], "eval_json": result["path"],
                     "grids": write_grids(result, out, name)})
    cls_config = json.loads((cls_dir / "config.json").read_text())
    md = report(rows, cls_config, steps, n, args, quick, real)
    from zoo.atomic import write_text

    write_text(out / "results.md", md)
    write_text(state_file, json.dumps({"models": {r["model"]: r for r in rows}, "steps": steps, "n": n,
                                       "threshold": args.threshold, "classifier": cls_config,
                                       "real_holdout_distortion": real,
                                       "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=2) + "\n")
    print(table(rows, list(CATEGORIES), real))
    print(f"\nwrote {out / 'results.md'}")
    return 0


def report(rows: list[dict], cls: dict, steps: int, n: int, args, quick: bool, real: dict) -> str:
    from zoo.training.emoji import CATEGORIES

    command = "python benchmarks/emoji_experiment.py " + " ".join(sys.argv[1:]) if sys.argv[1:] else \
        "python benchmarks/emoji_experiment.py"
    grids = "\n".join(f"- {r['model']}: [samples](samples_{Path(r['recipe']).stem}.png)"
                      + (f", [rejected](rejected_{Path(r['recipe']).stem}.png)" if "rejected" in r["grids"] else "")
                      for r in rows)
    return (f"# emoji32: DiMR-2R vs U-ViT vs DiT{' (--quick: toy sizes, numbers mean nothing)' if quick else ''}\n\n"
            f"`{command}` ({time.strftime('%Y-%m-%d', time.gmtime())}): {steps} training steps per model "
            f"({'batch 4' if quick else 'batch'} and seed of the recipes), {n} samples each (EMA, DPM-Solver++ "
            f"{2 if quick else 20} steps, CFG w = 2), FD "
            f"of {args.extractor} features against the {cls['holdout_size']}-image emoji32 holdout, "
            f"distortion = own-class probability < {args.threshold:g} under the emoji32 ConvNeXt classifier "
            f"(holdout accuracy {cls['holdout_accuracy']:.3f}; majority class {cls['majority_baseline']:.3f}).\n\n"
            f"{table(rows, list(CATEGORIES), real)}\n\nGrids:\n{grids}\n")


if __name__ == "__main__":
    from zoo.errors import UserError

    try:
        sys.exit(main())
    except UserError as err:  # e.g. a recipe changed under a run being resumed: one line, as the zoo commands do
        print(f"emoji_experiment: error: {' '.join(str(err).split())}", file=sys.stderr)
        sys.exit(2)
