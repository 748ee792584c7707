"""``zoo list [KIND]``: every registered component with its source and one-line description."""

from __future__ import annotations

import argparse

from zoo import registry


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "list",
        help="list registered blocks, conditioners, backbones, solvers and schedules",
        description="List registered components: name, where it comes from (distribution or in-process), "
        "and the first line of its docstring. Components that fail to load are listed with the error.",
    )
    p.add_argument("kind", nargs="?", help=f"one of {', '.join(registry.KINDS)} (default: all)")
    p.set_defaults(func=run)


def format_table(rows: list[tuple[str, ...]], indent: str = "  ") -> str:
    """Rows as left-aligned columns (the last column is not padded)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join(indent + "  ".join([c.ljust(w) for c, w in zip(r, widths)] + [r[-1]]).rstrip() for r in rows)


def run(args: argparse.Namespace) -> int:
    kinds = [registry.check_kind(args.kind)] if args.kind else list(registry.KINDS)
    for i, kind in enumerate(kinds):
        entries = registry.entries(kind)
        print(("\n" if i else "") + f"{kind}s ({registry.GROUPS[kind]}): {len(entries)}")
        if entries:
            print(format_table([(e.name, e.source, e.summary()) for e in entries]))
    return 0
