"""``zoo sample CKPT_OR_RECIPE``: sample a grid of images with a solver and classifier-free guidance.

    zoo sample runs/dit/last --n 16 --solver dpm_solver++ --steps 25 --cfg 1.5 --class 3 --seed 0 --out grid.png

Solver, steps and guidance default to the recipe's ``sample`` section; ``--cfg`` is read in the
recipe's guidance convention (DiT's w, or U-ViT/DiMR's s = w − 1), which is printed.
"""

from __future__ import annotations

import argparse
import sys
import time

from zoo.commands import add_overrides_option, add_respacing_option
from zoo.precision import PRECISIONS


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sample",
        help="sample an image grid from a checkpoint (or a recipe's untrained model)",
        description="Sample N images and write them as one PNG grid. Reproducible for a seed and "
        "independent of --batch-size, except for adaptive solvers (ode with dopri5 and the other "
        "adaptive methods, dpm_solver method adaptive), whose step sizes are chosen for the whole batch.",
    )
    p.add_argument("source", metavar="CKPT_OR_RECIPE",
                   help="checkpoint directory (config.json + model/ema.safetensors), a zoo train run directory "
                   "(its newest checkpoint: last/, or a step_*/ saved after it) or a recipe (random weights)")
    p.add_argument("--n", type=int, default=None,
                   help="number of images (default: one per label when --class lists several, else 16)")
    p.add_argument("--solver", default=None, help="solver name (default: the recipe's sample.solver)")
    p.add_argument("--steps", type=int, default=None, help="solver steps (default: the recipe's)")
    add_respacing_option(p)
    p.add_argument("--cfg", type=float, default=None,
                   help="guidance scale in the recipe's convention (dit: w, 1 = off; uvit: s, 0 = off)")
    p.add_argument("--class", dest="class_labels", default=None, metavar="C[,C...]",
                   help="class of every image, or one per image: 3,7,207, or the dataset's class names "
                        "or their first letters (emoji32: flags,smileys; default: the recipe's sample.labels, "
                        "a random class per image, or image i of class i mod K where it is balanced)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"),
                   help="model and sampling precision (float64 for parity checks; default float32)")
    p.add_argument("--seed", type=int, default=None, help="seed (default: the recipe's sample.seed, else 0)")
    p.add_argument("--out", default="samples.png",
                   help="output PNG (default samples.png); replaces only a PNG zoo wrote")
    p.add_argument("--batch-size", type=int, default=None, help="images per model batch (default: the recipe's)")
    p.add_argument("--vae", default=None, metavar="DIR",
                   help="local directory of the SD KL-f8 VAE weights (latent models; default: the recipe's data.vae)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--precision", default=None, choices=PRECISIONS,
                   help="model calls: fp32, tf32 (CUDA), bf16 or fp16 autocast (default: the recipe's "
                        "sample.precision, else PyTorch's defaults)")
    add_overrides_option(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from zoo.errors import UserError

    if args.n is not None and args.n < 1:
        raise UserError(f"--n must be at least 1, got {args.n}")
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")

    import torch

    from zoo.diffusion.setup import guidance_settings
    from zoo.sample import (SampleRequest, build_solver, check_before_weights, label_names, load_decoder, model_for,
                            parse_class_labels, refuse_non_finite, sample_latents, sample_recipe, sampling_precision,
                            save_grid, to_images)
    from zoo.seeds import check_seed, recipe_seed

    from zoo.guards import check_png_output, resolve_device, resolve_sample_source

    if args.seed is not None:
        check_seed(args.seed)  # before the model is built and its weights read
    device = str(resolve_device(args.device))
    out = check_png_output(args.out)
    source = resolve_sample_source(args.source)  # a path that does not exist never falls back to a shipped recipe
    start = time.perf_counter()
    recipe = sample_recipe(source, args.overrides, args.solver)
    labels = parse_class_labels(args.class_labels, label_names(source, recipe))
    request = SampleRequest(n=args.n, seed=recipe_seed(recipe, args.seed), solver=args.solver, steps=args.steps, cfg=args.cfg,
                            class_labels=labels, batch_size=args.batch_size, respacing=args.respacing,
                            precision=args.precision)
    check_before_weights(recipe, args.solver, args.steps, args.respacing, args.precision, getattr(torch, args.dtype),
                         request=request)
    model, origin = model_for(source, recipe, device=device, dtype=getattr(torch, args.dtype))
    if "NO weights" in origin:
        print(f"zoo sample: warning: {origin}", file=sys.stderr)
    else:
        print(f"zoo sample: {origin}")
    decoder = load_decoder(recipe, args.vae, device)  # a latent model's VAE: missing or bad weights fail here
    _check_grid_memory(model, recipe, request.count(), args.vae)
    solver, spec = build_solver(recipe, args.solver, args.steps, respacing=args.respacing)
    unsaid = "steps" not in spec and "respacing" not in spec and isinstance(getattr(solver, "steps", None), int)
    default = f" ({solver.steps} steps, its default)" if unsaid else ""  # --solver ddpm drops the recipe's steps
    if getattr(solver, "batch_coupled", False):  # adaptive: its `steps` is a placeholder no step count follows
        default = " (adaptive: rtol and atol set its steps)"
    print(f"zoo sample: solver {spec}{default}; {guidance_settings(recipe, args.cfg).describe()}")
    from tqdm import tqdm

    with tqdm(unit=" model calls", desc="zoo sample", disable=None, leave=False) as bar:  # no bar off a terminal
        x, _ = sample_latents(model, recipe, request, device=device, progress=bar.update)
    refuse_non_finite(x, f"the {x.shape[0]} samples", f"{out} not written",  # a NaN image saves as black
                      sampling_precision(recipe, args.precision, getattr(torch, args.dtype)))
    images = to_images(x, recipe, args.vae, device=device, decoder=decoder)
    path = save_grid(images, out)
    count = f"{images.shape[0]} image{'s' * (images.shape[0] != 1)}"
    print(f"zoo sample: wrote {count} ({images.shape[-1]}x{images.shape[-2]}) to {path} "
          f"in {time.perf_counter() - start:.1f} s")
    return 0


def _check_grid_memory(model, recipe: dict, n: int, vae: str | None) -> None:
    """Every sample is kept, decoded and tiled into one PNG in host memory: refuse an --n that cannot be
    (it sampled for hours, then met the OOM killer); about 12 bytes per pixel (float images, the grid)."""
    import torch

    from zoo.errors import UserError
    from zoo.memory import available_bytes, gib
    from zoo.meta import example_inputs
    from zoo.sample import vae_weights
    from zoo.vae import vae_downsample

    weights = vae_weights(recipe, vae)
    side = int(example_inputs(model)[0].shape[-1]) * (vae_downsample(weights) if weights is not None else 1)
    need, free = 12 * 3 * side * side * n, available_bytes(torch.device("cpu"))
    if free is not None and need > free:
        raise UserError(f"--n {n} images of {side}x{side} need about {gib(need)} of memory for one grid, and "
                        f"{gib(free)} is free", suggestion=f"use --n {max(free // (36 * side * side), 1)} or less")

