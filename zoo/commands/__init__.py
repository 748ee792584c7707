"""Subcommands of the ``zoo`` CLI, one module each (see :mod:`zoo.cli`), and their shared options."""

from __future__ import annotations

import argparse

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
