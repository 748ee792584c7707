"""``zoo train RECIPE --out DIR``: train a recipe's model as its ``train`` and ``data`` sections say.

    zoo train recipes/dit_s_2.yaml --out runs/dit_s --set data.root=/data/latents --set train.batch_size=64
    zoo train recipes/dit_s_2.yaml --out runs/dit_s --resume runs/dit_s/last

The run directory holds ``step_XXXXXXX/`` per save, ``last/`` (newest), ``log.jsonl`` and
``samples/``. Ctrl-C saves ``last/`` and exits with 130.
"""

from __future__ import annotations

import argparse

from zoo.commands import add_overrides_option


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="train a recipe's model (checkpoints, EMA, logs, sample grids)",
                              description="Train the recipe's model; write checkpoints and logs into --out.")
    p.add_argument("recipe", metavar="RECIPE", help="recipe YAML")
    p.add_argument("--out", required=True, metavar="DIR", help="run directory")
    add_overrides_option(p)
    p.add_argument("--resume", default=None, metavar="DIR", help="checkpoint (or run) directory to continue from")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--steps", type=int, default=None, help="train until this step (default: train.steps)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import zoo
    from zoo.errors import UserError
    from zoo.training import train

    if args.steps is not None and args.steps < 0:
        raise UserError(f"--steps must be >= 0, got {args.steps}")
    recipe = zoo.load_recipe(args.recipe, args.overrides)
    records = train(recipe, args.out, steps=args.steps, device=args.device, resume=args.resume)
    last = f"; last loss {records[-1]['loss']:.5f}" if records else ""
    print(f"zoo train: done; checkpoint {args.out}/last{last}")
    return 0
