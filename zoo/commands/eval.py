"""``zoo eval RUN_OR_CKPT --n N``: sample N images and report FD, IS, precision/recall, per-class FD.

    zoo eval runs/emoji_dimr --n 1024 --ref emoji32                       # offline extractor, holdout split
    zoo eval ckpt/dit_xl_2 --n 50000 --ref VIRTUAL_imagenet256_labeled.npz --extractor inception \\
        --extractor-weights pt_inception-2015-12-05-6726825d.pth --vae VAE_DIR

    zoo eval ckpt/dit_xl_2 --n 50000 --solver ddim --respacing ddim25 --cfg 1.5 ...  # DiT's create_diffusion("ddim25")
    zoo eval runs/emoji_dit --n 1024 --solver ode --steps 8 --set sample.solver.method=rk4  # any zoo sample option
    torchrun --nproc_per_node 8 -m zoo eval ckpt/dit_xl_2 --num-samples 50000 ...   # 8 GPUs share the sampling

Samples are written in shards under RUN/eval/ and reused by the next run with the same protocol
(an interrupted eval resumes); the result with its protocol goes to RUN/eval/*.json.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from zoo.commands import add_overrides_option, add_respacing_option, add_weights_option
from zoo.guards import user_path
from zoo.precision import PRECISIONS


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval", help="sample a checkpoint and report FD, Inception Score, precision/recall, per-class FD",
        description="Sample N images (EMA weights, the recipe's sample section; per-sample seeds; resumable shards "
        "in RUN/eval/) and score them against reference statistics with a registered feature extractor.")
    p.add_argument("source", metavar="RUN_OR_CKPT",
                   help="run directory (its newest checkpoint: last/, or a step_*/ saved after it) or checkpoint directory")
    p.add_argument("--n", "--num-samples", dest="n", type=int, default=None,
                   help="number of samples (default: the recipe's sample.num_samples, 50000 in the paper recipes); "
                        "under torchrun write --num-samples (torchrun's own parser takes --n for its --nnodes)")
    p.add_argument("--ref", default=None, metavar="DATASET_OR_NPZ",
                   help="reference: an .npz (ADM reference batch or zoo statistics), an image folder, or a "
                   "registered dataset[:split] (default: the recipe's data.dataset where it is registered and made of "
                   "images, e.g. emoji32 (its holdout split) or synthetic; image folders and latents need --ref)")
    p.add_argument("--extractor", default="efficientnet_lite0",
                   help="registered feature extractor (default efficientnet_lite0, offline; inception = the FID network)")
    p.add_argument("--extractor-weights", default=None, metavar="FILE",
                   help="local weights of the extractor (inception: pt_inception-2015-12-05-6726825d.pth; "
                   "or $ZOO_INCEPTION_WEIGHTS)")
    p.add_argument("--solver", default=None, help="solver name (default: the recipe's sample.solver)")
    p.add_argument("--steps", type=int, default=None, help="solver steps (default: the recipe's)")
    add_respacing_option(p)
    p.add_argument("--cfg", type=float, default=None, help="guidance scale in the recipe's convention")
    p.add_argument("--batch-size", type=int, default=None, help="images per batch (default: the recipe's)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the per-sample seeds (default: the recipe's sample.seed, else 0)")
    add_weights_option(p, "raw", "EMA or raw weights (default: EMA where the checkpoint has them, else raw)")
    p.add_argument("--vae", default=None, metavar="DIR", help="local SD VAE weights (latent models)")
    p.add_argument("--out", default=None, type=user_path, metavar="DIR", help="eval directory (default: RUN/eval)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--precision", default=None, choices=PRECISIONS,
                   help="model calls while sampling: fp32, tf32 (CUDA), bf16 or fp16 autocast "
                        "(default: the recipe's sample.precision, else PyTorch's defaults)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    add_overrides_option(p, help="override a sampling value of the checkpoint's recipe, as zoo sample takes it, "
                         "e.g. --set sample.solver.method=rk4 or --set sample.solver.eta=1.0 (VALUE is YAML; "
                         "repeatable; the model section and the diffusion keys its weights were trained under are "
                         "fixed); the values it changes are part of the protocol")
    from zoo.eval.distortion_cli import add_options

    add_options(p)
    p.set_defaults(func=run)


def _summary(result: dict) -> str:
    m = result["metrics"]
    parts = [f"FD {m['fd']:.3f}"]
    if "is_mean" in m:
        parts.append(f"IS {m['is_mean']:.3f} ± {m['is_std']:.3f}")
    if "is_skipped" in m:
        parts.append(f"no IS ({m['is_skipped']})")
    if "precision" in m:
        parts.append(f"precision {m['precision']:.3f}  recall {m['recall']:.3f}")
    if "precision_recall_skipped" in m:
        parts.append(f"no precision/recall ({m['precision_recall_skipped']})")
    if "per_class_fd_mean" in m:
        parts.append(f"per-class FD (mean of {len(m['per_class_fd'])}) {m['per_class_fd_mean']:.3f}")
    if "per_class_fd_skipped" in m:
        parts.append(f"no per-class FD ({m['per_class_fd_skipped']})")
    ext = result["extractor"]["name"]
    return f"zoo eval: {result['n']} samples, {ext} features vs {result['reference']['spec']}: " + "  ".join(parts)


def _json_log(line: str) -> None:
    """Under --json, stdout is the result alone: progress lines are dropped, warnings and notes (a reference
    at another resolution than the samples) go to stderr, where a script still sees them."""
    import sys

    if "warning:" in line or "note:" in line:
        print(line, file=sys.stderr)


def _checked_arguments(args: argparse.Namespace) -> tuple[str, Any]:
    """The device and the distortion scorer (or None), after the checks that need no samples."""
    from zoo.errors import UserError

    from zoo.domains import MAX_COUNT

    if args.n is not None and not 2 <= args.n <= MAX_COUNT:
        raise UserError(f"--n must be at least 2 and at most {MAX_COUNT:,} (as sample.num_samples), got {args.n}")
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    from zoo.seeds import check_seed

    if args.seed is not None:
        check_seed(args.seed)
    from zoo.guards import resolve_device

    device = str(resolve_device(args.device))  # an unknown device or cuda without a GPU: one line, exit 2
    if args.out is not None:  # before any sampling: --out is (or can become) a directory
        from zoo.guards import check_outside_checkpoints, check_parents

        out = args.out
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {out} is a file; zoo eval writes samples and results into a directory",
                            suggestion="choose a directory path")
        check_parents(out, "--out")
        check_outside_checkpoints(out, "--out")
    if args.weights == "ema":  # asked for by name: not the raw weights in its place, as zoo export diffusers says
        from zoo.checkpoint import require_ema
        from zoo.eval.runner import locate

        require_ema(locate(args.source)[0])
    from zoo.eval.distortion_cli import scorer_for

    # a missing or mismatched classifier fails before sampling, on every rank; rank 0 alone scores the samples,
    # so the others check it on the cpu (under torchrun 'cuda' is still cuda:0 here: N copies on GPU 0)
    scorer = scorer_for(args, device if os.environ.get("RANK", "0") == "0" else "cpu")
    return device, scorer


def run(args: argparse.Namespace) -> int:
    from zoo.errors import reported_by_rank_0

    with reported_by_rank_0():  # the same arguments and files on every torchrun rank: the same mistake
        device, scorer = _checked_arguments(args)
    from zoo.eval.distortion import analyse
    from zoo.eval.runner import EvalRequest, evaluate

    request = EvalRequest(source=args.source, n=args.n, ref=args.ref, extractor=args.extractor,
                          extractor_weights=args.extractor_weights, solver=args.solver, steps=args.steps,
                          cfg=args.cfg, batch_size=args.batch_size, seed=args.seed, weights=args.weights or "ema",
                          out=args.out, vae=args.vae, device=device, precision=args.precision,
                          respacing=args.respacing, overrides=args.overrides)
    from zoo.training.distributed import shutdown

    try:
        result = evaluate(request, log=_json_log if args.json else print, progress=not args.json)
    finally:
        shutdown()  # under torchrun: leave the process group (a no-op in one process)
    if result is None:  # another rank than 0 under torchrun: its shards are written, rank 0 reports
        return 0
    if scorer is not None:
        result = analyse(result, scorer, args.threshold, args.batch_size or 64, device,
                         log=_json_log if args.json else print)
    if args.json:
        print(json.dumps(result))
    else:
        print(_summary(result))
        print(f"zoo eval: wrote {result['path']}")
    return 0
