"""``zoo export diffusers CKPT --out DIR``: a zoo checkpoint in another library's layout."""

from __future__ import annotations

import argparse
from pathlib import Path

from zoo.errors import UserError

FORMATS = ("diffusers",)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export",
        help="write a zoo checkpoint as a diffusers model directory",
        description="Write CKPT as a diffusers model (config.json + diffusion_pytorch_model.safetensors) that "
        "ZooTransformer2DModel.from_pretrained loads and diffusers' DiTPipeline samples with a diffusers scheduler.",
    )
    p.add_argument("format", choices=FORMATS, help="target layout")
    p.add_argument("checkpoint", type=Path, help="zoo checkpoint directory (config.json + model.safetensors), "
                   "or a zoo train run directory (its newest checkpoint, RUN/last)")
    p.add_argument("--out", required=True, type=Path, help="directory to write (a new path, or an empty directory)")
    p.add_argument("--weights", choices=("ema", "model"), default="ema",
                   help="which weights to export (default: ema if the checkpoint has them, else model)")
    p.add_argument("--force", action="store_true", help="replace --out if it already is a zoo diffusers export")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from zoo.checkpoint import checkpoint_of

    checkpoint = checkpoint_of(args.checkpoint.expanduser())  # repaired; a run directory: its last/, as zoo sample
    if not checkpoint.is_dir():
        raise UserError(f"{checkpoint} is not a checkpoint directory",
                        suggestion="pass a directory written by zoo train or zoo convert")
    from zoo.guards import check_outside_checkpoints

    check_outside_checkpoints(args.out)
    try:
        from zoo.integrations.diffusers import export
    except ImportError as err:
        raise UserError(f"zoo export diffusers needs diffusers ({err})", suggestion='pip install -e ".[vae]"') from None
    out = export(checkpoint, args.out, use_ema=args.weights == "ema", force=args.force)
    print(f"wrote {out} (diffusers ZooTransformer2DModel from {checkpoint})")
    return 0
