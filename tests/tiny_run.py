"""The tiny training run the loop and resume pins share: tests/recipes/tiny_train.yaml (a class-conditional
DiT on 8x8 synthetic pixels) with no grids, checkpoints, log lines or warm-up unless a test asks."""

from __future__ import annotations

from pathlib import Path

import zoo

RECIPE = Path(__file__).parent / "recipes" / "tiny_train.yaml"
QUIET = lambda *_: None  # noqa: E731  # a Trainer's log that prints nothing
PLAIN = ["train.sample_every=0", "train.ckpt_every=0", "train.log_every=0", "train.warmup_steps=0",
         "train.batch_size=4"]


def plain_recipe(*overrides: str) -> dict:
    """The tiny recipe with :data:`PLAIN` and then ``overrides`` applied."""
    return zoo.load_recipe(RECIPE, [*PLAIN, *overrides])
