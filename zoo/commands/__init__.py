"""Subcommands of the ``zoo`` CLI, one module each (see :mod:`zoo.cli`), and their shared options."""

from __future__ import annotations

import argparse
import os
import shlex
from typing import Sequence

OVERRIDES_HELP = "override a recipe value, e.g. --set model.depth=12 (VALUE is YAML; repeatable)"


def add_overrides_option(parser: argparse.ArgumentParser, help: str = OVERRIDES_HELP) -> None:
    """The repeatable ``--set KEY=VALUE`` recipe override every recipe-taking command accepts."""
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help)


def add_respacing_option(parser: argparse.ArgumentParser) -> None:
    """``--respacing SPEC``: the respaced ``ddpm``/``ddim`` chain of the sampling commands (``zoo.sample.build_solver``)."""
    parser.add_argument("--respacing", default=None, metavar="SPEC",
                        help="ddpm/ddim chain as ADM/DiT name it: '250', '10,15,20' or 'ddim25' (replaces --steps)")


def add_weights_option(parser: argparse.ArgumentParser, raw_word: str, help: str, default: str | None = None) -> None:
    """``--weights ema|raw|model``: the EMA or the trained weights. ``raw`` and ``model`` (the file
    ``model.safetensors``) name the same, so a flag copied from one command works in the next;
    ``raw_word`` is the one this command's code reads."""
    parser.add_argument("--weights", type=lambda value: raw_word if value in ("raw", "model") else value,
                        choices=("ema", raw_word), default=default, metavar="{ema,raw}",
                        help=f"{help} ('model' and 'raw' name the same)")


#: the commands that share their work among torchrun's processes; every other command runs in one
DISTRIBUTED_COMMANDS = ("train", "eval", "prepare-latents")
#: what else to run instead of a one-process command under torchrun
_INSTEAD_UNDER_TORCHRUN = {
    "sample": "to split a large set of samples over processes, torchrun ... -m zoo eval CHECKPOINT --num-samples N",
}


def refuse_torchrun(command: str, argv: Sequence[str]) -> None:
    """Stop a one-process ``command`` launched by torchrun (``WORLD_SIZE`` > 1) before it does anything:
    every process would do the same work and print and write the same output (a second export then
    found the first's files and failed the run). One line, from rank 0, naming ``zoo ARGV`` to run."""
    from zoo.errors import UserError, reported_by_rank_0

    if command in DISTRIBUTED_COMMANDS or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    instead = f"; {_INSTEAD_UNDER_TORCHRUN[command]}" if command in _INSTEAD_UNDER_TORCHRUN else ""
    with reported_by_rank_0():
        raise UserError(f"zoo {command} runs in one process: under torchrun every process would do the same work "
                        "and print and write the same output",
                        suggestion=f"run it without torchrun: zoo {shlex.join(argv)}{instead}")
