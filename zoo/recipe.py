"""Recipes: YAML files with ``_base_`` inheritance and ``a.b.c=VALUE`` overrides.

A recipe is read with PyYAML's safe loader (plus one fix: ``1e-4`` is a float, as in YAML
1.2), keeping the file and line of every key so that a mistake found later can be reported
as ``FILE:LINE: key a.b.c: ...``. ``_base_: PATH`` (or a list of paths, relative to the
file) names recipes this one inherits from: mappings merge key by key, everything else is
replaced, and a component whose ``type`` differs from its base's replaces it whole (so a
base's DiT options never leak into a U-ViT). Overrides from ``--set`` apply last.
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

import yaml

from .errors import UserError, did_you_mean

KeyPath = tuple  # tuple[str | int, ...]: dict keys and list indices
Origin = tuple  # tuple[str, int | None]: (file label, line)

BASE_KEY = "_base_"


class RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader, also reading ``1e-4`` and ``2.5e3`` (YAML 1.2 floats) as floats."""


RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


@dataclass
class Recipe:
    """A resolved recipe: plain data plus where each key came from."""

    data: dict[str, Any]
    origins: dict[KeyPath, Origin] = field(default_factory=dict)
    source: str = "<recipe dict>"

    def origin(self, path: KeyPath) -> Origin:
        """File and line of ``path``, or of its nearest ancestor that has one."""
        for n in range(len(path), 0, -1):
            if path[:n] in self.origins:
                return self.origins[path[:n]]
        return (self.source, None)

    def error(self, path: KeyPath, message: str, suggestion: str | None = None) -> UserError:
        """A :class:`UserError` located at ``path`` (to raise)."""
        file, line = self.origin(path)
        return UserError(message, file=file, line=line, key_path=format_path(path) or None, suggestion=suggestion)


def format_path(path: Iterable[Any]) -> str:
    return ".".join(str(p) for p in path)


def parse_yaml(text: str, file: str) -> tuple[Any, dict[KeyPath, Origin]]:
    """Parse one YAML document safely; return the data and the line of every key and list item."""
    loader = RecipeLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
        origins: dict[KeyPath, Origin] = {}
        if node is not None:
            _record_lines(loader, node, (), file, origins)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line = mark.line + 1 if mark is not None else None
        raise UserError(f"invalid YAML: {err.problem or err.context}", file=file, line=line) from None
    except yaml.YAMLError as err:
        raise UserError(f"invalid YAML: {err}", file=file) from None
    finally:
        loader.dispose()
    return data, origins


def _record_lines(loader: RecipeLoader, node: yaml.Node, path: KeyPath, file: str, out: dict) -> None:
    if len(path) > 64:  # a recursive alias (&a [*a]); no recipe nests this deep
        raise UserError("recipe nests too deeply (a recursive alias?)", file=file, key_path=format_path(path[:3]) + "...")
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:  # merge keys (<<) are already flattened in here
            key = loader.construct_object(key_node) if isinstance(key_node, yaml.ScalarNode) else None
            line = key_node.start_mark.line + 1
            if key_node.start_mark.index >= node.start_mark.index:  # written here, not merged from an anchor
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


def find_recipe(path: str | Path) -> Path:
    """``path`` itself, or else the recipe of that name shipped in ``zoo.recipes``."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_absolute():
        raise UserError(f"recipe file not found: {path}")
    shipped = resources.files("zoo.recipes")
    name = path.name if path.suffix in (".yaml", ".yml") else path.name + ".yaml"
    relative = Path(*path.parts[1:]) if path.parts[:1] == ("recipes",) else path
    for candidate in (shipped.joinpath(str(relative.parent), name), shipped.joinpath(name)):
        if candidate.is_file():
            return Path(str(candidate))
    known = sorted(p.name for p in shipped.iterdir() if p.name.endswith(".yaml"))
    raise UserError(f"recipe file not found: {path} (nor among the shipped recipes)", suggestion=did_you_mean(name, known))


def load_file(path: str | Path, label: str | None = None, _stack: tuple = ()) -> Recipe:
    """Read one recipe file and its ``_base_`` chain into a :class:`Recipe` (no overrides)."""
    path = Path(path)
    label = label or str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"recipe file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read recipe: {err}", file=label) from None
    data, origins = parse_yaml(text, label)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"a recipe must be a mapping of sections, got {type(data).__name__}", file=label, line=1)
    return _apply_bases(Recipe(data, origins, label), path.parent, _stack + (path.resolve(),))


def _apply_bases(recipe: Recipe, base_dir: Path, stack: tuple) -> Recipe:
    bases = recipe.data.pop(BASE_KEY, None)
    if bases is None:
        return recipe
    items = bases if isinstance(bases, list) else [bases]
    merged = Recipe({}, {}, recipe.source)
    for i, base in enumerate(items):
        where = (BASE_KEY, i) if isinstance(bases, list) else (BASE_KEY,)
        if not isinstance(base, str):
            raise recipe.error(where, f"{BASE_KEY} must be a path or a list of paths, got {base!r}")
        base_path = base_dir / base
        if base_path.resolve() in stack:
            raise recipe.error(where, f"{BASE_KEY} {base!r} inherits from itself (cycle)")
        if not base_path.is_file():
            raise recipe.error(where, f"base recipe not found: {base!r} (looked at {base_path})")
        merged = merge(merged, load_file(base_path, os.path.normpath(base_path), stack))
    return merge(merged, recipe)


def merge(base: Recipe, over: Recipe) -> Recipe:
    """``over`` on top of ``base``: mappings merge, other values (and changed component types) replace."""
    replaced: list[KeyPath] = []
    data = _deep_merge(base.data, over.data, (), replaced)
    origins = {p: o for p, o in base.origins.items() if not any(p[: len(r)] == r for r in replaced)}
    origins.update(over.origins)
    return Recipe(data, origins, over.source)


def _deep_merge(base: dict, over: dict, path: KeyPath, replaced: list) -> dict:
    out = dict(base)
    for key, value in over.items():
        old = out.get(key)
        same_type = isinstance(old, dict) and isinstance(value, dict) and old.get("type", value.get("type")) == value.get("type", old.get("type"))
        if same_type:
            out[key] = _deep_merge(old, value, path + (key,), replaced)
        else:
            out[key] = value
            if key in base:
                replaced.append(path + (key,))
    return out


def parse_override(text: str) -> tuple[KeyPath, Any]:
    """``"model.depth=12"`` -> ``(("model", "depth"), 12)``; the value is parsed as YAML."""
    key, sep, value = text.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise UserError(f"override {text!r} must look like key.path=VALUE (e.g. model.depth=12)")
    if parts[0] == BASE_KEY:
        raise UserError(f"override {text!r}: {BASE_KEY} cannot be overridden; write a recipe that inherits instead")
    parsed, _ = parse_yaml(value, f"--set {text}")
    return tuple(int(p) if p.isdigit() else p for p in parts), parsed


def apply_override(recipe: Recipe, text: str) -> None:
    """Set one ``key.path=VALUE`` in place (a bare component name becomes ``{type: NAME}``)."""
    path, value = parse_override(text)
    label = f"--set {text}"
    node: Any = recipe.data
    for i, part in enumerate(path[:-1]):
        child = node[part] if _has(node, part) else None
        if isinstance(child, str) and isinstance(node, dict):  # bare component name
            child = node[part] = {"type": child}
        elif child is None:
            child = node[part] = {}
        if not isinstance(child, (dict, list)):
            raise UserError(f"cannot set {format_path(path)}: {format_path(path[: i + 1])} is {child!r}, not a mapping",
                            file=label)
        node = child
    if isinstance(node, list) and not _has(node, path[-1]):
        raise UserError(f"cannot set {format_path(path)}: no item {path[-1]} in a list of {len(node)}", file=label)
    node[path[-1]] = value
    for p in [p for p in recipe.origins if p[: len(path)] == path]:
        del recipe.origins[p]
    recipe.origins[path] = (label, None)
    for sub in _paths(value, path):
        recipe.origins[sub] = (label, None)


def _has(node: Any, key: Any) -> bool:
    if isinstance(node, list):
        return isinstance(key, int) and 0 <= key < len(node)
    return isinstance(node, dict) and key in node


def _paths(value: Any, path: KeyPath) -> Iterable[KeyPath]:
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, sub in items:
        yield path + (key,)
        yield from _paths(sub, path + (key,))


def resolve(recipe: str | Path | dict | Recipe, overrides: Iterable[str] = ()) -> Recipe:
    """Load a recipe (path, dict or :class:`Recipe`), apply its bases and the overrides."""
    if isinstance(recipe, Recipe):
        resolved = Recipe(copy.deepcopy(recipe.data), dict(recipe.origins), recipe.source)
    elif isinstance(recipe, dict):
        resolved = _apply_bases(Recipe(copy.deepcopy(recipe)), Path.cwd(), ())
    else:
        path = find_recipe(recipe)
        resolved = load_file(path, str(recipe) if Path(recipe).is_file() else str(path))
    for text in overrides:
        apply_override(resolved, text)
    return resolved


def resolve_recipe(recipe: str | Path | dict, overrides: Iterable[str] = ()) -> dict[str, Any]:
    """The fully resolved recipe as plain data (bases merged, overrides applied, not validated)."""
    return resolve(recipe, overrides).data
