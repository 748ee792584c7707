"""``zoo parity GOLDEN.pt [--family F]``: compare the zoo model with an official implementation's outputs."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "parity",
        help="check a zoo model against a golden file of the official implementation",
        description="Build the zoo model from the golden file's official config, convert and strictly load its "
        "weights, run its inputs and print the max abs / rel error (exit 0 only if max abs <= 1e-4).",
    )
    p.add_argument("golden", type=Path, help="golden file (config, state_dict, inputs, outputs)")
    p.add_argument("--family", choices=("dit", "uvit", "dimr"), default=None,
                   help="model family (default: from the file name or config)")  # fmt: skip
    p.add_argument("--fp64", action="store_true", help="run in float64 against outputs_fp64 (against outputs, saying so, when the file has none)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from zoo.parity import TOLERANCE, run_parity

    result = run_parity(args.golden, args.family, dtype=torch.float64 if args.fp64 else torch.float32)
    verdict = "ok" if result.passed else f"FAIL (tolerance {TOLERANCE:g})"
    print(f"{args.golden.name}: family {result.family}, {verdict}")
    if args.fp64 and result.reference != "outputs_fp64":
        print(f"--fp64: {args.golden.name} holds no outputs_fp64; the float64 run was compared with its outputs instead")
    print(f"max abs error {result.max_abs:.3e}  max rel error {result.max_rel:.3e}")
    return 0 if result.passed else 1
