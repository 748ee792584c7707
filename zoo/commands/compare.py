"""``zoo compare RECIPE...``: recipes side by side (params, GFLOPs, step time, peak memory, ms per NFE),
and trained runs with what they reached (step, loss, validation loss, FD).

    zoo compare recipes/dimr_*.yaml --no-time                  # sizes and GFLOPs only, on the meta device: seconds
    zoo compare recipes/emoji32/{dimr_2r,uvit,dit}.yaml --batch 8 --json  # + interleaved timing of every recipe
    zoo compare recipes/ablation/*.yaml --no-time              # with the paper's Table 2 parameter counts
    zoo compare runs/dimr runs/uvit runs/dit --no-time         # three trained runs: + step, loss, val loss, FD
"""

from __future__ import annotations

import argparse
import json

from zoo.commands import add_overrides_option


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "compare", help="recipes (and trained runs) side by side: params, GFLOPs, step time, peak memory, ms per NFE, "
        "a run's step, loss, val loss and FD",
        description="One row per recipe. Timing runs every recipe in this process, round-robin, so ratios hold on "
        "a busy machine; --no-time keeps to parameters and GFLOPs (meta device, nothing allocated). A zoo train "
        "run directory (its newest checkpoint: last/, or a step_*/ saved after it) or a checkpoint directory is "
        "compared as its recipe, with what the run recorded: its step, the loss over its last 10% of steps, the "
        "val_loss and FD at that step.")
    p.add_argument("recipes", nargs="+", metavar="RECIPE", help="recipe files, shipped recipe names, zoo train run "
                   "directories or checkpoint directories")
    add_overrides_option(p)
    p.add_argument("--json", action="store_true", help="print a JSON list: recipe, params, trainable_params, gflops, "
                   "train_step_ms, peak_mem_mb, sample_ms_per_nfe (null when not timed), and run for a run")
    p.add_argument("--plot", default=None, metavar="OUT.png", help="draw GFLOPs against params and step time (.png, .svg or .pdf)")
    p.add_argument("--batch", type=int, default=4, help="batch size of the timed steps (default 4)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--no-time", action="store_true", help="parameters and GFLOPs only")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds before timing (default 2, at most 10,000)")
    p.add_argument("--repeats", type=int, default=5,
                   help="timed rounds; the median is reported (default 5, at most 10,000)")
    p.set_defaults(func=run)


PLOT_SUFFIXES = (".png", ".svg", ".pdf")
MAX_ROUNDS = 10_000  # --warmup, --repeats: far past what a median needs (99999999999999999999 never ended)


def check_plot_output(path: str) -> None:
    """``--plot`` names a PNG, SVG or PDF file in a directory that can exist, replacing only a plot zoo wrote."""
    from pathlib import Path

    from zoo.compare import a_zoo_plot
    from zoo.errors import UserError
    from zoo.guards import check_outside_checkpoints, check_png_output, check_writable

    out = Path(path).expanduser()
    if out.is_dir():
        raise UserError(f"--plot {out} is a directory; give the file to write, e.g. {out / 'compare.png'}")
    if out.suffix.lower() not in PLOT_SUFFIXES:
        raise UserError(f"--plot {out}: give a path ending in {', '.join(PLOT_SUFFIXES)}")
    if out.suffix.lower() == ".png":
        check_png_output(out, "--plot")  # its parents, checkpoints, owner and a writable directory
        return
    if out.is_file() and not a_zoo_plot(out):  # a user's SVG or PDF (its creator field is not zoo compare)
        raise UserError(f"--plot {out} exists and is a file zoo did not write; zoo will not replace it",
                        suggestion="move it away or choose another path")
    check_writable(out, "--plot")  # before the timing, not after it
    check_outside_checkpoints(out, "--plot")


def check_memory(recipes: list[str], overrides: list[str], batch: int, device: str) -> None:
    """The timed training steps at ``batch`` must fit on ``device`` (as zoo train and zoo sample check theirs):
    one line instead of an allocator traceback or the OOM killer. Every recipe's weights and AdamW state stay
    resident together (the timing is interleaved); one step at a time adds its gradients and activations, with
    the recipe's grad checkpointing as the timed step runs it."""
    import torch

    import zoo
    from zoo.compare import recipe_source
    from zoo.errors import UserError
    from zoo.memory import GRAD_BYTES_PER_PARAM, available_bytes, estimate, gib
    from zoo.meta import NotOnMeta
    from zoo.training.loop import set_grad_checkpointing

    free = available_bytes(torch.device(device))
    if free is None:  # nothing to compare with
        return
    sized = []  # (recipe, resident bytes, a step's gradient bytes, activation bytes per sample)
    for recipe in recipes:
        resolved = zoo.load_recipe(recipe_source(recipe, overrides), list(overrides))
        train = resolved.get("train") or {}
        with torch.device("meta"):
            model = zoo.build_model(resolved)
        if train.get("grad_checkpointing"):  # as Bench trains it: only the blocks' inputs are kept
            set_grad_checkpointing(model, True)
        try:
            est = estimate(model, training=True, half_precision=train.get("precision") in ("bf16", "fp16"), ema=False)
        except NotOnMeta:  # a plugin's data-dependent code: it may well run on real tensors
            continue
        grads = est.params * GRAD_BYTES_PER_PARAM  # there during a step only
        sized.append((recipe, est.fixed - grads, grads, est.per_sample))  # resident: weights and AdamW's moments
    if not sized:
        return
    resident = sum(r for _, r, _, _ in sized)
    name, _, grads, per_sample = max(sized, key=lambda s: s[2] + s[3] * batch)  # the largest step
    need = resident + grads + per_sample * batch
    if need <= free:
        return
    room = [(free - resident - g) // p if p else (batch if free >= resident + g else 0) for _, _, g, p in sized]
    fits = min(room)  # the largest batch at which every recipe's step fits beside all the resident state
    dev = torch.device(device).type
    if len(sized) == 1:
        raise UserError(f"timing {name} at --batch {batch} needs about {gib(need)} ({gib(resident + grads)} "
                        f"of weights, gradients and AdamW state + {gib(per_sample * batch)} of activations) but "
                        f"the {dev} device has {gib(free)} free",
                        suggestion=f"use --batch {fits} or less, or --no-time" if fits >= 1
                        else "use --no-time, or a device with more memory")
    fewer = "compare fewer recipes at a time"
    raise UserError(f"timing {', '.join(r for r, _, _, _ in sized)} together at --batch {batch} needs about "
                    f"{gib(need)} ({gib(resident)} of the {len(sized)} models' weights and AdamW state, all resident "
                    f"at once, + {gib(grads + per_sample * batch)} of gradients and activations in the largest step, "
                    f"{name}'s) but the {dev} device has {gib(free)} free",
                    suggestion=f"{fewer}, use --batch {fits} or less, or --no-time" if fits >= 1
                    else f"{fewer}, or --no-time")


def note_fd_protocols(rows: list) -> None:
    """One note when the runs' FDs were measured differently (sample count, extractor, reference, EMA or raw
    weights, sampler with its precision, labels and batch, the classes drawn from, the VAE): such FDs are not
    comparable (a smaller N alone raises FD)."""
    import sys

    runs = [row for row in rows if row.run is not None and row.run.fd is not None]
    protocols = {(r.run.fd_n, r.run.fd_extractor, r.run.fd_weights, r.run.fd_sampler, r.run.fd_classes) for r in runs}
    # the VAE as recorded by zoo eval (a train.eval_every FD does not say; a pixel model has none)
    vaes = {json.dumps(r.run.fd_vae, sort_keys=True) for r in runs if r.run.fd_vae is not None}
    # the reference as resolved ("--ref ref" run in two folders is two references), under any key it goes by
    keys = [{r.run.fd_reference_key, *r.run.fd_reference_aliases} for r in runs]
    if len(protocols) > 1 or len(vaes) > 1 or any(not a & b for i, a in enumerate(keys) for b in keys[i + 1:]):
        how = "".join(f"\n  {r.recipe}: n={r.run.fd_n} {r.run.fd_extractor}, reference {r.run.fd_reference}"
                      + (f" ({r.run.fd_reference_key})" if r.run.fd_reference_key != r.run.fd_reference else "")
                      + f", {r.run.fd_weights} weights, {r.run.fd_sampler}"
                      + (f", {r.run.fd_classes} classes" if r.run.fd_classes is not None else "")
                      + (f", VAE {_vae_text(r.run.fd_vae)}" if r.run.fd_vae is not None else "") for r in runs)
        print("zoo compare: note: the FDs were measured differently, so they are not comparable (zoo eval RUN --n N "
              f"--ref REF with one sampler for each run makes them so):{how}", file=sys.stderr)


def _vae_text(vae: dict) -> str:
    """A recorded VAE in a few characters: its weights' sha256 start and its latent scale."""
    return f"{str(vae.get('weights_sha256'))[:12]} scale {vae.get('scale')}"


def note_loss_settings(rows: list) -> None:
    """One note when the runs' losses were computed under different diffusion settings (objective,
    prediction, weighting, time sampling, schedule): such losses are not comparable, their FDs are."""
    import sys

    from zoo.diffusion.sections import DIFFUSION_DEFAULTS
    from zoo.recipe_diff import first_difference
    from zoo.run_summary import LOSS_SETTINGS

    runs = [row for row in rows if row.run is not None and row.run.loss_settings is not None]
    # compared as the resume check compares them: a schedule's left-out keys are its defaults, 5 is 5.0
    differ = [key for key in LOSS_SETTINGS if any(
        first_difference({key: r.run.loss_settings[key]}, {key: runs[0].run.loss_settings[key]}, "diffusion",
                         DIFFUSION_DEFAULTS) for r in runs[1:])]
    if differ:
        how = "".join(f"\n  {r.recipe}: " + ", ".join(f"diffusion.{key}={_flow(r.run.loss_settings[key])}"
                                                      for key in differ) for r in runs)
        print("zoo compare: note: the runs' losses and val losses were computed under different diffusion settings, "
              "so they are not comparable (their FDs are, measured alike):" + how, file=sys.stderr)


def _flow(value) -> str:
    """A setting as a recipe writes it in one line ({type: multiscale, coeffs: [0.25, 1.0]})."""
    from zoo.recipe_yaml import dump_yaml

    return dump_yaml(value, default_flow_style=True, sort_keys=False, width=1 << 30).removesuffix("...\n").strip()


def run(args: argparse.Namespace) -> int:
    import sys

    from zoo.errors import UserError

    if args.batch < 1 or args.repeats < 1 or args.warmup < 0:
        raise UserError("--batch and --repeats must be at least 1 and --warmup at least 0")
    if args.warmup > MAX_ROUNDS or args.repeats > MAX_ROUNDS:
        raise UserError(f"--warmup and --repeats must be at most {MAX_ROUNDS:,}, got {args.warmup} and {args.repeats}")
    from zoo.compare import format_table, measure, plot
    from zoo.guards import resolve_device

    device = str(resolve_device(args.device))  # an unknown device or cuda without a GPU: one line, exit 2
    if args.plot:  # before minutes of timing: a path the plot can be written to
        check_plot_output(args.plot)

    from zoo.compare import check_not_a_base_file, recipe_source
    from zoo.recipe import resolve

    for recipe in args.recipes:  # a glob's _base_*.yaml: named as a base file, timed or not
        check_not_a_base_file(recipe, resolve(recipe_source(recipe, args.overrides), list(args.overrides)).data)
    if not args.no_time:  # before any model is built: an allocator traceback or the OOM killer otherwise
        check_memory(args.recipes, args.overrides, args.batch, device)
    rows = measure(args.recipes, args.overrides, batch=args.batch, device=device, warmup=args.warmup,
                   repeats=args.repeats, time_it=not args.no_time, log=lambda m: print(m, file=sys.stderr))
    note_fd_protocols(rows)
    note_loss_settings(rows)
    if args.plot:
        path = plot(rows, args.plot)
        print(f"zoo compare: wrote {path}", file=sys.stderr)
    if args.json:
        print(json.dumps([row.to_json() for row in rows]))
    else:
        print(format_table(rows))
    return 0
