"""``zoo train-classifier RECIPE_OR_DATASET --out DIR``: the classifier of the distortion analysis.

    zoo train-classifier emoji32 --out runs/emoji_classifier                 # train split, holdout accuracy
    zoo train-classifier recipes/emoji32/dimr_2r.yaml --out runs/cls --steps 500
    zoo eval runs/emoji_dimr --n 512 --ref emoji32 --distortion --classifier runs/emoji_classifier

A small ConvNeXt (registered ``convnext`` blocks, plain LayerNorm) trained on the data a recipe
or dataset name gives; its accuracy on the holdout is printed and stored in DIR/config.json
beside DIR/model.safetensors (written crash-safely: a directory appears whole or not at all).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

from zoo.cli import positive_float, positive_int
from zoo.commands import add_overrides_option
from zoo.domains import MAX_BATCH, MAX_DEPTH, MAX_SIZE, MAX_STEPS, MAX_WIDTH

# options whose size the model and its training grow with: what to lower when they do not fit
SIZE_OPTIONS = "lower --image-size, --dims, --depths or --batch-size"


def _ints(most: int) -> Callable[[str], list[int]]:
    """An argparse ``type``: comma-separated integers in 1..``most`` (``--depths 100000,1`` hung building the model)."""
    def ints(text: str) -> list[int]:
        try:
            values = [int(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
        if not values or min(values) < 1:
            raise argparse.ArgumentTypeError(f"{text!r}: give positive integers, e.g. 32,64")
        if max(values) > most:
            raise argparse.ArgumentTypeError(f"{text!r}: {max(values)} is more than {most:,}, the most it may be")
        return values
    return ints


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train-classifier", help="train a small ConvNeXt classifier (for zoo eval --distortion)",
        description="Train a small ConvNeXt classifier (zoo's convnext blocks, plain LayerNorm) on a recipe's data "
                    "or a registered dataset; report its holdout accuracy; save it to --out.")
    p.add_argument("source", metavar="RECIPE_OR_DATASET", help="recipe YAML (its data section) or a dataset name")
    p.add_argument("--out", required=True, metavar="DIR", help="classifier directory (config.json, model.safetensors)")
    p.add_argument("--force", action="store_true",
                   help="replace --out if it already is a zoo classifier (nothing else is ever replaced)")
    add_overrides_option(p)
    p.add_argument("--steps", type=positive_int, default=1500, help="optimizer steps (default 1500)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per step (default 64)")
    p.add_argument("--lr", type=positive_float, default=2e-3, help="peak learning rate (default 2e-3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the init, batches, augmentation (and split); default 0")
    p.add_argument("--image-size", type=positive_int, default=None, help="image size (default: the data's, else 32)")
    p.add_argument("--dims", type=_ints(MAX_WIDTH), default=[32, 64], help="channels per resolution (default 32,64)")
    p.add_argument("--depths", type=_ints(MAX_DEPTH), default=[2, 2], help="convnext blocks per resolution (default 2,2)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--json", action="store_true", help="print the record as one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from zoo.classifier import check_out, save_classifier
    from zoo.classifier_train import ClassifierDiverged, load_data, train_classifier
    from zoo.errors import UserError
    from zoo.guards import check_outside_checkpoints, resolve_device
    from zoo.memory import out_of_memory_said
    from zoo.seeds import check_seed

    _check_bounds(args)
    check_seed(args.seed, draws="the init, batches and split")
    if len(args.dims) != len(args.depths):
        raise UserError(f"--dims {args.dims} and --depths {args.depths} need the same number of entries")
    device = str(resolve_device(args.device))
    check_outside_checkpoints(args.out)
    out = check_out(args.out, replace=args.force)  # before the data are read and the steps spent
    log = (lambda _: None) if args.json else print
    try:
        with out_of_memory_said(SIZE_OPTIONS):  # the data read, the model built, its steps
            data = load_data(args.source, args.image_size, args.overrides, args.seed)
            log(f"zoo train-classifier: {len(data.train_y)} training, {len(data.holdout_y)} holdout images "
                f"({data.holdout}), {data.num_classes} classes, {tuple(data.train_x.shape[1:])}")
            model, record = train_classifier(data, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                             seed=args.seed, device=device,
                                             arch={"dims": args.dims, "depths": args.depths}, log=log)
    except ClassifierDiverged as err:  # as zoo train's NonFiniteError: exit 1, nothing saved
        print(f"zoo train-classifier: error: {err}", file=sys.stderr)
        return 1
    from zoo.checkpoint import versions

    record["source"], record["versions"] = args.source, versions()
    save_classifier(out, model, record)
    if args.json:
        print(json.dumps({**record, "path": str(out)}))
    else:
        print(f"zoo train-classifier: holdout accuracy {record['holdout_accuracy']:.4f} on {record['holdout_size']} "
              f"images (train {record['train_accuracy']:.4f}; majority class {record['majority_baseline']:.4f}); "
              f"wrote {out}")
    return 0


def _check_bounds(args: argparse.Namespace) -> None:
    """Counts past what any run needs: ``--steps 99999999999999999999`` trained forever, a huge ``--image-size``
    was a traceback."""
    from zoo.errors import UserError

    for flag, value, most, like in (("--steps", args.steps, MAX_STEPS, "train.steps"),
                                    ("--batch-size", args.batch_size, MAX_BATCH, "train.batch_size"),
                                    ("--image-size", args.image_size, MAX_SIZE, "data.image_size")):
        if value is not None and value > most:
            raise UserError(f"{flag} must be >= 1 and at most {most:,} (as {like}), got {value}")
