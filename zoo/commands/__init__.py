"""Subcommands of the ``zoo`` CLI, one module each (see :mod:`zoo.cli`), and their shared options."""

from __future__ import annotations

import argparse


def add_overrides_option(parser: argparse.ArgumentParser) -> None:
    """The repeatable ``--set KEY=VALUE`` recipe override every recipe-taking command accepts."""
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe value, e.g. --set model.depth=12 (VALUE is YAML; repeatable)")
