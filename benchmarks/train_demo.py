"""Steps/s and peak memory of the real training loop (``zoo.training.Trainer``: data, per-sample
draws, forward, backward, AdamW, EMA) for the emoji32 demo recipes and, on GPUs, the paper recipes
under DDP (``torchrun``, one process per GPU, synthetic data of the model's input shape).

    python benchmarks/train_demo.py                         # recipes/emoji32/*.yaml on this machine
    python benchmarks/train_demo.py --paper --batch 32      # + paper recipes on all GPUs (DDP), 32 per GPU
    python benchmarks/train_demo.py --only dimr_2r --steps 20

Each recipe runs in its own process (its own ``torchrun`` on GPUs), so the peak memory is its alone:
``torch.cuda.max_memory_allocated`` on CUDA (rank 0), the ``ru_maxrss`` of the process on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAPER = ["dit_xl_2", "uvit_h_2", "dimr_xl_2r", "dimr_g_2r"]


def one(recipe: str, steps: int, warmup: int, batch: int | None, precision: str | None, out: str) -> None:
    """Time ``steps`` steps after ``warmup`` of one recipe in this process (rank 0 prints one JSON line)."""
    import torch

    import zoo
    from zoo.training import Trainer

    overrides = ["train.sample_every=0", "train.ckpt_every=0", "train.log_every=0"]
    if batch:
        overrides += [f"train.batch_size={batch * int(os.environ.get('WORLD_SIZE', '1'))}"]
    if precision:
        overrides += [f"train.precision={precision}"]
    r = zoo.load_recipe(recipe, overrides + synthetic_data(recipe, overrides))
    trainer = Trainer(r, out, log=lambda *_: None)
    trainer.save = lambda *a, **k: None  # the end of each run() saves last/ (11-17 GB at XL sizes): not measured
    trainer.run(warmup)
    cuda = trainer.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer.run(warmup + steps)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if trainer.ctx.main:
        print(json.dumps({"recipe": Path(recipe).stem, "device": trainer.ctx.describe(),
                          "params": sum(p.numel() for p in trainer.model.parameters()),
                          "batch": trainer.batch, "precision": trainer.train["precision"],
                          "steps_per_s": steps / seconds, "images_per_s": steps * trainer.batch / seconds,
                          "peak_gib": peak / 2**30}), flush=True)


def synthetic_data(recipe: str, overrides: list[str]) -> list[str]:
    """The ``--set``s that swap a recipe's files (ImageNet latents, an image folder) for synthetic data of
    its model's input shape (a latent recipe's ``data.image_size`` is the pixel size: 256, not 32)."""
    import zoo
    from zoo.meta import build_on_meta, example_inputs

    data = zoo.load_recipe(recipe, overrides).get("data", {})
    if data.get("dataset") not in ("imagenet", "latents", "image_folder"):
        return []
    model = build_on_meta(lambda: zoo.build_model(recipe, overrides))
    size = example_inputs(model, 1)[0].shape[-1]
    batch = int(zoo.load_recipe(recipe, overrides)["train"]["batch_size"])
    return ["data.dataset=synthetic", f"data.size={2 * batch}", "data.root=null", f"data.image_size={size}"]


def launch(recipe: str, args: argparse.Namespace, gpus: int) -> dict | None:
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, __file__, "--one", recipe, "--out", out, "--steps", str(args.steps),
               "--warmup", str(args.warmup)]
        cmd += ["--batch", str(args.batch)] if args.batch else []
        cmd += ["--precision", args.precision] if args.precision else []
        if gpus > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(gpus),
                   *cmd[1:]]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    if proc.returncode or not lines:
        print(f"{Path(recipe).stem}: failed: {(proc.stderr.strip().splitlines() or ['no output'])[-1]}", file=sys.stderr)
        return None
    return json.loads(lines[-1])


def main() -> int:
    from zoo.cli import non_negative_int, positive_int

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=positive_int, default=10)
    p.add_argument("--warmup", type=non_negative_int, default=3)
    p.add_argument("--batch", type=positive_int, default=None, help="per-process batch (default: the recipe's)")
    p.add_argument("--precision", default=None, choices=("fp32", "bf16", "fp16"), help="default: the recipe's")
    p.add_argument("--paper", action="store_true", help="also the paper recipes, DDP on every GPU")
    p.add_argument("--only", default=None, help="one recipe name")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        return one(args.one, args.steps, args.warmup, args.batch, args.precision, args.out)
    import torch

    runs = [(str(f), 1) for f in sorted((ROOT / "recipes" / "emoji32").glob("[!_]*.yaml"))]
    if args.paper:
        if not torch.cuda.is_available():  # as every benchmark refuses a GPU-only option: one line, exit 2
            p.error("--paper: no CUDA GPU is available on this machine (the paper recipes run under DDP on GPUs; "
                    "without --paper the emoji32 recipes run here)")
        runs += [(str(ROOT / "recipes" / f"{name}.yaml"), torch.cuda.device_count()) for name in PAPER]
    if args.only:
        known = [Path(r).stem for r, _ in runs]
        if args.only not in known:
            p.error(f"--only {args.only}: not one of {', '.join(known)}")
        runs = [(r, g) for r, g in runs if Path(r).stem == args.only]
    print(f"{'recipe':<12} {'device':<34} {'params':>13} {'batch':>6} {'prec':>5} {'steps/s':>8} {'img/s':>9} {'peak GiB':>9}")
    failed = 0
    for recipe, gpus in runs:
        r = launch(recipe, args, gpus)
        failed += r is None
        if r:
            print(f"{r['recipe']:<12} {r['device']:<34} {r['params']:>13,} {r['batch']:>6} {r['precision']:>5} "
                  f"{r['steps_per_s']:>8.2f} {r['images_per_s']:>9.1f} {r['peak_gib']:>9.2f}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
