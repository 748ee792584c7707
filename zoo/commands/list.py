"""``zoo list [KIND [NAME]] [--verbose]``: registered components, their sources and descriptions.

``--verbose`` (or naming one component) adds each constructor argument with its type, default
and allowed values, the rules between arguments, and the keys of the recipe sections.
"""

from __future__ import annotations

import argparse
import functools
from typing import Any

from zoo import registry
from zoo.errors import UserError, did_you_mean


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "list",
        help="list registered " + ", ".join(f"{kind}s" for kind in registry.KINDS[:-1]) + f" and {registry.KINDS[-1]}s",
        description="List registered components: name, where it comes from (distribution or in-process), "
        "and the first line of its docstring. Components that fail to load are listed with the error. "
        "--verbose (or KIND NAME) also shows every argument: type, default and allowed values.",
    )
    p.add_argument("kind", nargs="?", help=f"one of {', '.join(registry.KINDS)} (default: all)")
    p.add_argument("name", nargs="?", help="one component of KIND: show its arguments")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="show each component's arguments (type, default, allowed values) and the recipe sections")
    p.set_defaults(func=run)


def format_table(rows: list[tuple[str, ...]], indent: str = "  ") -> str:
    """Rows as left-aligned columns (the last column is not padded)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join(indent + "  ".join([c.ljust(w) for c, w in zip(r, widths)] + [r[-1]]).rstrip() for r in rows)


def component_details(entry: registry.Entry, indent: str = "      ") -> str:
    """The arguments of one component (name, type, default, allowed values) and its rules, as text."""
    try:
        obj = entry.load()
    except UserError as err:
        return f"{indent}error: {err}"
    if entry.kind == "dataset":  # a builder function: what it takes is the recipe's data keys it reads
        return dataset_details(obj, indent)
    if not isinstance(obj, type):  # another plain function takes no recipe arguments
        return ""
    rows = parameter_rows(obj)
    text = format_table([("argument", "type", "default", "allowed")] + rows, indent) if rows else ""
    rules = rule_texts(obj)
    if rules:
        text += f"\n{indent}rules: " + "; ".join(rules)
    for name, record in _records(obj):  # DiMR's branches: the keys each list item takes
        sub = parameter_rows(record, from_parent=False)
        text += f"\n{indent}{name}: each item a mapping of\n" + format_table(
            [("key", "type", "default", "allowed")] + sub, indent + "  ")
        if rule_texts(record):
            text += f"\n{indent}  rules: " + "; ".join(rule_texts(record))
    return text


#: The ``data`` keys every dataset reads (``zoo train`` and ``zoo eval`` read them whatever the dataset).
COMMON_DATA_KEYS = ("root", "split", "num_classes", "random_flip", "num_workers")


def dataset_details(builder: Any, indent: str = "      ") -> str:
    """The ``data`` section keys a dataset builder reads, with what each allows (its own splits, no
    ``root`` where it reads none, ``latent_keys`` where it gives latents); a builder without a ``reads``
    list is shown every optional key."""
    from zoo.training.data import OPTIONAL_KEYS, reads_root
    from zoo.training.sections import DATA
    from zoo.validate import table_rows

    reads = getattr(builder, "reads", None)
    keys = [k for k in COMMON_DATA_KEYS if k != "root" or reads_root(builder)]
    keys += [k for k in OPTIONAL_KEYS if reads is None or k in reads] + list(getattr(builder, "latent_keys", ()))
    rows = dict(table_rows({k: DATA[k] for k in keys}))
    rows["split"] = "one of " + ", ".join(getattr(builder, "splits", ("train",)))
    return format_table([("data key", "allowed")] + [(f"data.{k}", v) for k, v in rows.items()], indent)


def _records(obj: Any) -> list[tuple[str, type]]:
    """The parameters of ``obj`` that take a dataclass (or a list of them), with that dataclass."""
    from zoo.introspect import constructor_annotations, dataclass_in, item_annotation

    found = []
    for name, ann in constructor_annotations(obj).items():
        record = dataclass_in(ann) or dataclass_in(item_annotation(ann))
        if record is not None:
            found.append((name, record))
    return found


def find_entry(kind: str | None, name: str) -> registry.Entry:
    """The entry called ``name`` (in ``kind``, or the one kind that has it)."""
    if kind:
        return registry.find(registry.check_kind(kind), name)
    kinds = [k for k in registry.KINDS if name in registry.names(k)]
    if not kinds:
        known = [n for k in registry.KINDS for n in registry.names(k)]
        raise UserError(f"no registered component is called {name!r}", suggestion=did_you_mean(name, known))
    return registry.find(kinds[0], name)


def show_component(kind: str | None, name: str) -> str:
    """One component's description and arguments; without ``kind``, every kind's component of that name
    (a plugin's conditioner may share a block's name). One that cannot be loaded, or that two sources
    claim, raises its error (naming every source) instead of being listed with it twice."""
    kinds = [kind] if kind else [k for k in registry.KINDS if name in registry.names(k)] or [None]
    parts = []
    for entry in (find_entry(k, name) for k in kinds):
        entry.load()
        head = f"{entry.kind} {entry.name} ({entry.describe()}): {entry.summary()}"
        details = component_details(entry, "  ")
        parts.append(head + ("\n" + details if details else ""))
    return "\n\n".join(parts)


def section_details() -> str:
    """The keys of every recipe section that has a table, with what each allows."""
    from zoo.validate import SECTION_TABLES, _load_section_validators, table_rows

    _load_section_validators()
    parts = [f"{name}:\n" + format_table(table_rows(table), "      ") for name, table in SECTION_TABLES.items()]
    return "recipe sections (besides model):\n" + "\n".join("  " + p for p in parts)


def run(args: argparse.Namespace) -> int:
    if args.name:
        print(show_component(args.kind, args.name))
        return 0
    kinds = [registry.check_kind(args.kind)] if args.kind else list(registry.KINDS)
    for i, kind in enumerate(kinds):
        entries = registry.entries(kind)  # a name two sources claim is one row per source, counted once
        print(("\n" if i else "") + f"{kind}s ({registry.GROUPS[kind]}): {len({e.name for e in entries})}")
        if entries and not args.verbose:
            print(format_table([(e.name, e.source, e.summary()) for e in entries]))
        for entry in entries if args.verbose else ():
            print(f"  {entry.name}  ({entry.source})  {entry.summary()}")
            details = component_details(entry)
            if details:
                print(details)
    if args.verbose and not args.kind:
        print("\n" + section_details())
    return 0


def parameter_rows(obj: Any, from_parent: bool = True) -> list[tuple[str, str, str, str]]:
    """``(name, type, default, domain)`` of each constructor parameter of ``obj``, for listings.

    The default is ``required``, or ``(from parent)`` for what an enclosing component passes
    (``from_parent``: ``obj`` is a component a parent builds, not a plain record of settings).
    """
    from zoo.domains import domain_text
    from zoo.introspect import constructor_annotations, signature, type_name
    from zoo.validate import PARENT_SUPPLIED, kind_of_param

    sig = signature(obj)
    if sig is None:
        return []
    hints = constructor_annotations(obj)
    rows = []
    for name, p in sig.parameters.items():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            rows.append((("*" if p.kind is p.VAR_POSITIONAL else "**") + name, "any", "", ""))
            continue
        ann = hints.get(name, Any)
        kind = kind_of_param(name, ann)  # qk_norm: bool is a switch, not a conditioner
        type_text = f"{kind} component" if kind else type_name(ann)
        if p.default is not p.empty:
            default = _short(p.default)
        else:
            default = "(from parent)" if from_parent and name in PARENT_SUPPLIED else "required"
        rows.append((name, type_text, default, domain_text(ann)))
    return rows


def rule_texts(obj: Any) -> list[str]:
    """The cross-argument rules ``obj`` declares, in words."""
    from zoo.domains import constraints_of

    return [rule.describe() for rule in constraints_of(obj)]


def _short(value: Any) -> str:
    if isinstance(value, functools.partial):
        args = ", ".join(f"{k}={v!r}" for k, v in value.keywords.items())
        return f"{_short(value.func)}({args})"
    if isinstance(value, type) or callable(value):
        return getattr(value, "__name__", repr(value))
    return repr(value)
