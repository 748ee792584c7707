"""Reading one recipe's YAML: safe, bounded, and keeping the line of every key.

``yaml.safe_load`` semantics, except that plain scalars resolve as in the YAML 1.2 core schema
(PyYAML follows YAML 1.1, where ``010`` is 8, ``10:00`` is 600, ``yes`` is true and ``1e-4`` a
string; digits grouped as ``1_000`` are still read), with limits a hostile file cannot get
around: the size, the nesting depth and the number of nodes *with aliases expanded* are checked
while the YAML is composed into nodes, before any Python object is built. A 1 kB alias bomb
("billion laughs") expands to 10^9 nodes; 20,000-deep nesting would overflow the composer's
recursion; a 5,000-digit integer is a ValueError in Python. Real recipes are a few kB, a few
hundred nodes, nested ~6 deep. Events come from libyaml when PyYAML has it (the pure-Python
scanner takes seconds on a long line), else from PyYAML itself.
"""

from __future__ import annotations

import re
from typing import Any, Iterable

import yaml
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.resolver import Resolver

from .errors import UserError

KeyPath = tuple  # tuple[str | int, ...]: dict keys and list indices
Origin = tuple  # tuple[str, int | None]: (file label, line)

MAX_FILE_BYTES = 256 << 10  # 256 KiB
MAX_NODES = 5_000  # after expanding aliases; the largest shipped recipe has 145
MAX_DEPTH = 64
MAX_SCALAR_CHARS = 65_536
MAX_NUMBER_CHARS = 100

try:  # libyaml's event parser under PyYAML's own composer, constructor and resolver
    from yaml._yaml import CParser as _EventParser
except ImportError:  # PyYAML without libyaml
    from yaml.parser import Parser as _EventParser  # type: ignore[assignment]
    from yaml.reader import Reader
    from yaml.scanner import Scanner

    _PURE = (Reader, Scanner)
else:
    _PURE = ()


def format_path(path: Iterable[Any]) -> str:
    return ".".join(str(p) for p in path)


class RecipeTooLarge(yaml.MarkedYAMLError):
    """A YAML document beyond the bounds above (refused, not a syntax error)."""


class RecipeLoader(Composer, SafeConstructor, Resolver, _EventParser, *_PURE):
    """A safe loader that counts nodes (aliases expanded) and depth while composing."""

    def __init__(self, stream: str):
        if _PURE:
            Reader.__init__(self, stream)
            Scanner.__init__(self)
            _EventParser.__init__(self)
        else:
            _EventParser.__init__(self, stream)
        Composer.__init__(self)
        SafeConstructor.__init__(self)
        Resolver.__init__(self)
        self._depth = 0
        self._count = 0  # nodes so far, an alias counting as the nodes it stands for
        self._sizes: dict[int, tuple[int, int]] = {}  # id(node) -> (nodes, levels), aliases expanded
        self.merged: set[int] = set()  # id() of the key nodes a << merge key brought into a mapping

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        """PyYAML's merge (``<<``), remembering which keys it brought in: those are not duplicates
        of the keys written beside it, which override them."""
        own = {id(key) for key, _ in node.value}
        merges = [key for key, _ in node.value if key.tag == "tag:yaml.org,2002:merge"]
        if len(merges) > 1:  # safe_load keeps the last, silently, as for any other duplicate key
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate merge key << (first at line {merges[0].start_mark.line + 1}); merge "
                "several mappings with one: <<: [*a, *b]", merges[1].start_mark)
        super().flatten_mapping(node)
        self.merged.update(id(key) for key, _ in node.value if id(key) not in own)

    def _refuse(self, problem: str, mark: Any) -> RecipeTooLarge:
        return RecipeTooLarge(None, None, problem, mark)

    def _add(self, n: int, mark: Any) -> None:
        self._count += n
        if self._count > MAX_NODES:
            raise self._refuse(f"more than {MAX_NODES:,} YAML nodes with aliases expanded (a recipe has a few hundred)", mark)

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            target = self.anchors.get(event.anchor)
            if target is not None:
                if id(target) not in self._sizes:
                    raise self._refuse(f"alias *{event.anchor} refers to a node that contains it", event.start_mark)
                nodes, levels = self._sizes[id(target)]
                self._add(nodes, event.start_mark)
                self._check_depth(self._depth + levels, event.start_mark)
            return super().compose_node(parent, index)
        start = self._count
        self._add(1, self.peek_event().start_mark)
        self._depth += 1
        try:
            self._check_depth(self._depth, self.peek_event().start_mark)
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if isinstance(node, yaml.ScalarNode):
            self._check_scalar(node)
            levels = 1
        else:
            children = node.value if isinstance(node, yaml.SequenceNode) else [n for pair in node.value for n in pair]
            levels = 1 + max((self._sizes[id(child)][1] for child in children), default=0)
        self._sizes[id(node)] = (self._count - start, levels)
        return node

    def _check_depth(self, depth: int, mark: Any) -> None:
        if depth > MAX_DEPTH:
            raise self._refuse(f"nesting deeper than {MAX_DEPTH} levels (aliases expanded)", mark)

    def _check_scalar(self, node: yaml.ScalarNode) -> None:
        number = node.tag.endswith((":int", ":float"))
        limit, kind = (MAX_NUMBER_CHARS, "number") if number else (MAX_SCALAR_CHARS, "scalar")
        if len(node.value) > limit:
            raise self._refuse(f"a {kind} of {len(node.value):,} characters (at most {limit:,})", node.start_mark)


_INT = re.compile(r"[-+]?[0-9][0-9_]*|0o[0-7][0-7_]*|0x[0-9a-fA-F][0-9a-fA-F_]*")
_FLOAT = re.compile(r"[-+]?(?:\.[0-9][0-9_]*|[0-9][0-9_]*(?:\.[0-9_]*)?)(?:[eE][-+]?[0-9]+)?"
                    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)")
_BOOL = {"true": True, "True": True, "TRUE": True, "false": False, "False": False, "FALSE": False}
_BOOL_RE = re.compile("|".join(_BOOL))

# The YAML 1.2 core schema's plain scalars, in place of PyYAML's YAML 1.1 ones (no sexagesimal
# 10:00, no 0-prefixed octal, no yes/no/on/off, no dates); << merge keys and 1_000 are kept.
RecipeLoader.yaml_implicit_resolvers = {}
for _tag, _pattern, _first in (
    ("bool", _BOOL_RE, "tTfF"),
    ("int", _INT, "-+0123456789"),
    ("float", _FLOAT, "-+0123456789."),
    ("null", re.compile(r"null|Null|NULL|~|"), ["n", "N", "~", ""]),
    ("merge", re.compile(r"<<"), "<"),
):
    RecipeLoader.add_implicit_resolver(f"tag:yaml.org,2002:{_tag}", re.compile(rf"^(?:{_pattern.pattern})$"), list(_first))


def _scalar(loader: RecipeLoader, node: yaml.ScalarNode, pattern: re.Pattern, what: str) -> str:
    """The text of a plain or explicitly tagged (``!!int x``) scalar, which must be ``what``."""
    value = loader.construct_scalar(node)
    if not pattern.fullmatch(value):
        raise yaml.constructor.ConstructorError(None, None, f"{value!r} is not {what}", node.start_mark)
    return value


def _construct_int(loader: RecipeLoader, node: yaml.ScalarNode) -> int:
    value = _scalar(loader, node, _INT, "an integer (decimal, 0o octal or 0x hex)").replace("_", "")
    return int(value[2:], 8 if value[1] == "o" else 16) if value.startswith(("0o", "0x")) else int(value, 10)


def _construct_float(loader: RecipeLoader, node: yaml.ScalarNode) -> float:
    _scalar(loader, node, _FLOAT, "a number")
    return loader.construct_yaml_float(node)


def _construct_bool(loader: RecipeLoader, node: yaml.ScalarNode) -> bool:
    return _BOOL[_scalar(loader, node, _BOOL_RE, "true or false")]


RecipeLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)
RecipeLoader.add_constructor("tag:yaml.org,2002:float", _construct_float)
RecipeLoader.add_constructor("tag:yaml.org,2002:bool", _construct_bool)


class RecipeDumper(yaml.SafeDumper):
    """PyYAML's safe dumper, quoting every string :class:`RecipeLoader` would read back as another value
    (``"1e5"``, ``"0o17"``, ``"+.5"`` are numbers in YAML 1.2, plain strings to PyYAML's 1.1 rules), and,
    as before, those a YAML 1.1 reader would (``"yes"``, ``"010"``): a printed recipe reads back the same."""


RecipeDumper.yaml_implicit_resolvers = {
    first: RecipeLoader.yaml_implicit_resolvers.get(first, []) + yaml.SafeDumper.yaml_implicit_resolvers.get(first, [])
    for first in {*RecipeLoader.yaml_implicit_resolvers, *yaml.SafeDumper.yaml_implicit_resolvers}}


def dump_yaml(data: Any, **options: Any) -> str:
    """``data`` as YAML text that :func:`parse_yaml` reads back equal (``options`` as ``yaml.safe_dump`` takes)."""
    return yaml.dump(data, Dumper=RecipeDumper, **options)


def _line(mark: Any) -> int | None:
    return mark.line + 1 if mark is not None else None


def parse_yaml(text: str, file: str) -> tuple[Any, dict[KeyPath, Origin]]:
    """Parse one YAML document safely; return the data and the line of every key and list item."""
    if len(text) > MAX_FILE_BYTES:
        raise UserError(f"refused: {len(text):,} characters of YAML (at most {MAX_FILE_BYTES:,})", file=file)
    loader = RecipeLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
        origins: dict[KeyPath, Origin] = {}
        if node is not None:
            _record_lines(loader, node, (), file, origins)
    except RecipeTooLarge as err:
        raise UserError(f"refused: {err.problem}", file=file, line=_line(err.problem_mark)) from None
    except yaml.MarkedYAMLError as err:
        line = _line(err.problem_mark or err.context_mark)
        if line is not None:  # libyaml puts an error at the end of the input on the line after it
            line = min(line, text.count("\n") + 1)
        problem = err.problem or err.context
        if "nesting depth" in str(problem):  # PyYAML >= 6.0.4's parser has a depth limit of its own
            raise UserError(f"refused: nesting deeper than {MAX_DEPTH} levels", file=file, line=line) from None
        hint = None
        if line is not None and "\t" in (text.splitlines()[line - 1:line] or [""])[0]:
            hint = "YAML indents with spaces only: replace the tab on that line with spaces"
        raise UserError(f"invalid YAML: {problem}", file=file, line=line, suggestion=hint) from None
    except yaml.YAMLError as err:
        raise UserError(f"invalid YAML: {err}", file=file) from None
    finally:
        loader.dispose()
    return data, origins


def _record_lines(loader: RecipeLoader, node: yaml.Node, path: KeyPath, file: str, out: dict) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:  # merge keys (<<) are already flattened in here
            key = loader.construct_object(key_node) if isinstance(key_node, yaml.ScalarNode) else None
            line = key_node.start_mark.line + 1
            if id(key_node) not in loader.merged:  # written here, not merged in by <<
                if key in seen:  # safe_load would silently keep the last one
                    raise UserError(f"duplicate key {key!r} (first at line {seen[key]})",
                                    file=file, line=line, key_path=format_path(path + (key,)))
                seen[key] = line
            out[path + (key,)] = (file, line)
            _record_lines(loader, value_node, path + (key,), file, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out[path + (i,)] = (file, item.start_mark.line + 1)
            _record_lines(loader, item, path + (i,), file, out)
