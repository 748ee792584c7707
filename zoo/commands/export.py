"""``zoo export diffusers CKPT --out DIR``: a zoo checkpoint in another library's layout;
``zoo export npz SAMPLES --out FILE``: zoo eval's samples as the ADM evaluator's sample batch."""

from __future__ import annotations

import argparse

from zoo.commands import add_weights_option
from zoo.errors import UserError
from zoo.guards import user_path

FORMATS = ("diffusers", "npz")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export",
        help="write a checkpoint as a diffusers model, or zoo eval's samples as an ADM-style .npz",
        description="diffusers: write CKPT as a diffusers model (config.json + diffusion_pytorch_model.safetensors) "
        "that ZooTransformer2DModel.from_pretrained loads and diffusers' DiTPipeline samples with a diffusers "
        "scheduler. npz: write the samples of a zoo eval (RUN/eval/samples-...) as one .npz with arr_0 (uint8 "
        "N x H x W x 3) and arr_1 (labels), the sample batch of the official ADM evaluation suite.",
    )
    p.add_argument("format", choices=FORMATS, help="target layout")
    p.add_argument("checkpoint", type=user_path, metavar="SOURCE",
                   help="diffusers: a zoo checkpoint directory (config.json + model.safetensors) or a zoo train run "
                   "directory (its newest checkpoint: RUN/last/, or a step_*/ saved after it); npz: a samples-* directory of zoo eval, or the "
                   "run or eval directory holding exactly one")
    p.add_argument("--out", required=True, type=user_path,
                   help="diffusers: directory to write (a new path, or an empty directory); npz: the .npz file")
    p.add_argument("--n", type=int, default=None, help="npz: samples 0..N-1 (default: every sample there)")
    add_weights_option(p, "model", "diffusers: which weights to export (default: ema if the checkpoint has them, "
                       "else the raw ones)")
    p.add_argument("--force", action="store_true", help="replace --out if it already is a zoo export (diffusers directory, npz file)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.format == "npz":
        return _export_npz(args)
    if args.n is not None:
        raise UserError("--n is an option of zoo export npz (how many samples), not of diffusers")
    from zoo.checkpoint import checkpoint_of

    checkpoint = checkpoint_of(args.checkpoint)  # repaired; a run directory: its newest checkpoint, as zoo sample
    if not checkpoint.is_dir():
        raise UserError(f"{checkpoint} is not a checkpoint directory",
                        suggestion="pass a directory written by zoo train or zoo convert")
    from zoo.checkpoint import require_ema
    from zoo.guards import check_outside_checkpoints, check_writable

    if args.weights == "ema":  # else the raw ones went out as asked-for EMA
        require_ema(checkpoint)
    check_outside_checkpoints(args.out)
    check_writable(args.out)  # written beside itself, then renamed: afile.txt/d is one line, not a traceback
    try:
        from zoo.integrations.diffusers import export
    except ImportError as err:
        raise UserError(f"zoo export diffusers needs diffusers ({err})", suggestion="pip install 'zoo-diffusion[vae]'") from None
    out = export(checkpoint, args.out, use_ema=args.weights != "model", force=args.force)
    print(f"wrote {out} (diffusers ZooTransformer2DModel from {checkpoint})")
    return 0


def _export_npz(args: argparse.Namespace) -> int:
    from zoo.eval.adm_npz import export_adm_npz
    from zoo.guards import check_outside_checkpoints, check_writable

    if args.weights is not None:  # the samples were drawn with the weights zoo eval --weights chose
        raise UserError("--weights is an option of zoo export diffusers, not of npz (the samples' weights were "
                        "chosen by zoo eval --weights)", suggestion="drop --weights")
    if args.out.suffix.lower() != ".npz":  # s.NPZ too, as zoo sample takes g.PNG
        raise UserError(f"--out {args.out}: the sample batch is an .npz file", suggestion="give a path ending in .npz")
    check_outside_checkpoints(args.out)
    check_writable(args.out)
    out, n, shape, labelled = export_adm_npz(args.checkpoint, args.out, args.n, force=args.force)
    what = "arr_0 images" + (", arr_1 labels" if labelled else "")
    print(f"wrote {out} ({n} samples {shape[0]}x{shape[1]}: {what}; the ADM evaluator's sample batch)")
    return 0
