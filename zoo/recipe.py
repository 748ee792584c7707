"""Recipes: YAML files with ``_base_`` inheritance and ``a.b.c=VALUE`` overrides.

A recipe is read with PyYAML's safe loader (plain scalars resolved as in YAML 1.2: ``1e-4`` is a
float, ``010`` is 10, ``10:00`` and ``yes`` are strings) within bounds on size, depth and alias
expansion (:mod:`zoo.recipe_yaml`), keeping the file and line of every key so that a mistake
found later can be reported as ``FILE:LINE: key a.b.c: ...``. ``_base_: PATH`` (or a list of
paths, relative to the file) names recipes this one inherits from: mappings merge key by key,
everything else is replaced, and a component whose ``type`` differs from its base's replaces it
whole (so a base's DiT options never leak into a U-ViT). Overrides from ``--set`` apply last.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Mapping

from .errors import UserError, did_you_mean
from .recipe_yaml import MAX_FILE_BYTES, KeyPath, Origin, format_path, parse_yaml

BASE_KEY = "_base_"


@dataclass
class Recipe:
    """A resolved recipe: plain data plus where each key came from."""

    data: dict[str, Any]
    origins: dict[KeyPath, Origin] = field(default_factory=dict)
    source: str = "<recipe dict>"
    # how an origin's label reads in errors: an override given from Python, {"model.depth": 0}, is
    # "override {'model.depth': 0}" there, and "--set model.depth=0" in origins (which tell --sets apart)
    shown: dict[str, str] = field(default_factory=dict)

    def origin(self, path: KeyPath) -> Origin:
        """File and line of ``path``, or of its nearest ancestor that has one."""
        for n in range(len(path), 0, -1):
            if path[:n] in self.origins:
                return self._shown(self.origins[path[:n]])
        return (self.source, None)

    def origin_of(self, key_path: str) -> Origin | None:
        """File and line of a dotted key path (``model.branches.0.dim``) or of its nearest written
        ancestor; ``None`` if no part of it is in the recipe."""
        keys = tuple(int(k) if k.isdigit() else k for k in key_path.split("."))
        found = [keys[:n] for n in range(len(keys), 0, -1) if keys[:n] in self.origins]
        return self._shown(self.origins[found[0]]) if found else None

    def _shown(self, origin: Origin) -> Origin:
        return (self.shown.get(origin[0], origin[0]), origin[1])

    def locate(self, err: UserError) -> UserError:
        """``err`` with the file and line of its key path filled in where it names none; to re-raise."""
        where = self.origin_of(err.key_path) if err.key_path else None
        return err.locate(*where) if where else err

    def error(self, path: KeyPath, message: str, suggestion: str | None = None) -> UserError:
        """A :class:`UserError` located at ``path`` (to raise)."""
        file, line = self.origin(path)
        return UserError(message, file=file, line=line, key_path=format_path(path) or None, suggestion=suggestion)


def find_recipe(path: str | Path) -> Path:
    """``path`` itself, or else the shipped recipe at that place in ``zoo.recipes`` (a bare name, or ``recipes/...``)."""
    path = Path(path).expanduser()  # "~/r.yaml" from Python or a _base_: the shell expands only its own words
    checkpoint = path if path.is_dir() else path.parent
    if (checkpoint / "config.json").is_file() or (checkpoint / "last" / "config.json").is_file():
        if path.is_dir() or path.name == "config.json":  # its config.json holds the recipe inside a wrapper
            raise UserError(f"{path} is a zoo checkpoint, not a recipe file", suggestion=(
                f"zoo.from_checkpoint({str(checkpoint)!r}) builds its model with its weights; zoo sample, eval "
                "export and compare take the directory as it is"))
    if path.is_file():
        return path
    if path.is_dir():
        raise UserError(f"recipe {path} is a directory, not a recipe file",
                        suggestion=shadowed_recipe_hint(path) or "give a recipe's .yaml file")
    if path.exists():  # /dev/null, a FIFO: there, but no file to read
        raise UserError(f"recipe {path} is not a regular file", suggestion="give a recipe's .yaml file")
    shipped = shipped_recipe(path)
    if shipped is not None:  # but never runs/x/dit_s_2.yaml: a missing file is not a shipped recipe's name
        return shipped
    closest = _closest_recipes(_shipped_name(path))
    if path.is_absolute():
        raise UserError(f"recipe file not found: {path}", suggestion=closest)
    raise UserError(f"recipe file not found: {path} (nor among the shipped recipes)", suggestion=closest)


def _shipped_name(path: Path) -> str:
    """Where ``path`` would be among the shipped recipes: ``recipes/emoji32/dit`` -> ``emoji32/dit.yaml``
    (an absolute path by its name alone)."""
    name = path.name if path.suffix in (".yaml", ".yml") else path.name + ".yaml"
    if path.is_absolute():
        return name
    relative = Path(*path.parts[1:]) if path.parts[:1] == ("recipes",) else path
    return str(relative.parent / name)


def shadowed_recipe_hint(directory: Path) -> str | None:
    """For a folder named like a shipped recipe (``./dit_s_2/``, ``./emoji32/dit/``): how to name the
    recipe instead (the bare name reads the folder here, the recipe elsewhere)."""
    if directory.is_absolute() or shipped_recipe(directory) is None:
        return None
    return f"for the shipped recipe give {directory}.yaml: the bare name {directory} means this folder"


def shipped_recipe(path: str | Path) -> Path | None:
    """The shipped recipe ``path`` names (``dit_s_2``, ``emoji32/_base_emoji32``,
    ``recipes/ablation/row1_uvit_m4.yaml``), or ``None``; the current directory is never looked at."""
    path = Path(path)
    if path.is_absolute():
        return None
    candidate = resources.files("zoo.recipes").joinpath(_shipped_name(path))
    return Path(str(candidate)) if candidate.is_file() else None


def shipped_recipe_names() -> list[str]:
    """The shipped recipes' names, subfolders included (``dit_s_2.yaml``, ``emoji32/dimr_2r.yaml``), sorted;
    ``_base_*.yaml`` files are bases, not recipes."""
    known: list[str] = []

    def walk(folder: Any, prefix: str) -> None:
        for entry in folder.iterdir():
            if entry.is_dir() and not entry.name.startswith(("_", ".")):
                walk(entry, f"{prefix}{entry.name}/")
            elif entry.name.endswith(".yaml") and not entry.name.startswith("_"):
                known.append(prefix + entry.name)

    walk(resources.files("zoo.recipes"), "")
    return sorted(known)


def _closest_recipes(wanted: str) -> str | None:
    """"did you mean ...?" among the shipped recipes, subfolders included (``emoji32/dimr_2r.yaml``)."""
    known = shipped_recipe_names()
    same_name = sorted(k for k in known if k.rsplit("/", 1)[-1] == wanted.rsplit("/", 1)[-1])  # right name, folder
    if same_name:
        return did_you_mean(same_name[0], same_name)
    return did_you_mean(wanted, sorted(known))


def load_file(path: str | Path, label: str | None = None, _stack: tuple = ()) -> Recipe:
    """Read one recipe file and its ``_base_`` chain into a :class:`Recipe` (no overrides)."""
    path = Path(path)
    label = label or str(path)
    try:
        size = path.stat().st_size
        _refuse_binary(path, label)  # an image or a checkpoint given as the recipe: said as such, whatever its size
        if size > MAX_FILE_BYTES:
            raise UserError(f"refused: a recipe of {size:,} bytes (at most {MAX_FILE_BYTES:,})", file=label)
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"recipe file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read recipe: {err}", file=label) from None
    data, origins = parse_yaml(text, label)
    data = _unshared(data)  # YAML aliases (*name) become copies: a --set on one place changes that place only
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"a recipe must be a mapping of sections, got {type(data).__name__}", file=label, line=1)
    return _apply_bases(Recipe(data, origins, label), path.parent, _stack + (path.resolve(),))


#: How common files that are not recipes start, to name what was given instead.
_BINARY_KINDS = ((b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"PK\x03\x04", "a zip archive (a torch "
                 "checkpoint?)"), (b"\x93NUMPY", "a NumPy array"), (b"\x80", "a pickle (a torch checkpoint?)"))


def _refuse_binary(path: Path, label: str) -> None:
    """Refuse a file whose first 4 KiB are binary (NUL bytes, or a known binary format's start that UTF-8 cannot
    decode), naming what it looks like: ``zoo build grid.png`` said 'a recipe of 428,623 bytes (at most 262,144)'."""
    import codecs

    with path.open("rb") as f:
        head = f.read(4096)
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):  # UTF-16 (and -32) text: NULs, yet text
        raise UserError("the recipe is UTF-16 or UTF-32 text; zoo reads UTF-8", file=label,
                        suggestion="save it as UTF-8 (without a byte-order mark)")
    kind = next((name for magic, name in _BINARY_KINDS if head.startswith(magic)), None)
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)  # a character cut at 4096 is fine
        text = True
    except UnicodeDecodeError:  # a stray byte in a text file is left to the reader, whose message names its place
        text = False
    if b"\x00" in head or (kind is not None and not text):
        kind = kind or "binary data"
        raise UserError(f"not a YAML recipe: it is {kind}", file=label,
                        suggestion="pass a recipe .yaml file, or a shipped recipe by name such as dimr_xl_2r")


def _unshared(value: Any) -> Any:
    """``value`` with every mapping and list its own object (``copy.deepcopy`` would keep aliases shared)."""
    if isinstance(value, dict):
        return {k: _unshared(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unshared(v) for v in value]
    return value


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
        base_path = base_dir / Path(base).expanduser()  # "~/bases/x.yaml" is the home directory's
        if not base_path.is_file() and not looks_relative(base):  # `_base_: dit_s_2`: a shipped recipe by name,
            base_path = shipped_recipe(base) or base_path  # never a file of that name in the current directory
        if base_path.resolve() in stack:
            raise recipe.error(where, f"{BASE_KEY} {base!r} inherits from itself (cycle)")
        if not base_path.is_file():
            closest = None if looks_relative(base) else _closest_recipes(_shipped_name(Path(base)))
            raise recipe.error(where, f"base recipe not found: {base!r} (looked at {base_dir / base}, "
                                      f"and among the shipped recipes)", suggestion=closest)
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
        if isinstance(old, str) and isinstance(value, dict) and "type" not in value and "_target_" not in value:
            old = {"type": old}  # `block: transformer` in the base, `block: {qkv_bias: false}` here: as --set does
        same_type = isinstance(old, dict) and isinstance(value, dict) and _same_component(old, value)
        if same_type:
            out[key] = _deep_merge(old, value, path + (key,), replaced)
        else:
            out[key] = value
            if key in base:
                replaced.append(path + (key,))
    return out


def _same_component(old: dict, new: dict) -> bool:
    """Whether ``new`` refines the component ``old`` (same ``type`` / ``_target_`` where it names one)."""
    return all(old.get(k, new.get(k)) == new.get(k, old.get(k)) for k in ("type", "_target_")) and not (
        ("type" in old and "_target_" in new) or ("_target_" in old and "type" in new))


def looks_relative(base: str) -> bool:
    """Whether a ``_base_`` value is written as a path (``./x.yaml``, ``../x``, ``a/b.yaml``)."""
    return base.startswith((".", "/", "~"))


def override_key(text: str) -> tuple[str, ...]:
    """The key path an override names, unparsed: ``"sample.solver.steps=5"`` -> ``("sample", "solver", "steps")``."""
    return tuple(text.partition("=")[0].strip().split("."))


def parse_override(text: str) -> tuple[KeyPath, Any]:
    """``"model.depth=12"`` -> ``(("model", "depth"), 12)``; the value is parsed as YAML."""
    sep, value = text.partition("=")[1:]
    parts = override_key(text)
    if not sep or not all(parts):
        raise UserError(f"override {text!r} must look like key.path=VALUE (e.g. model.depth=12)")
    if parts[0] == BASE_KEY:
        raise UserError(f"override {text!r}: {BASE_KEY} cannot be overridden; write a recipe that inherits instead")
    parsed, _ = parse_yaml(value, f"--set {text}")
    return tuple(int(p) if p.isascii() and p.isdigit() else p for p in parts), parsed


def apply_override(recipe: Recipe, text: str) -> None:
    """Set one ``key.path=VALUE`` in place (a bare component name becomes ``{type: NAME}``; a changed
    ``type`` or ``_target_`` drops the keys the recipe gave the old component, as a ``_base_`` merge
    replaces it whole, and keeps those other ``--set`` overrides gave; a bare name given for a component,
    ``block=convnext``, drops the recipe's keys whatever the type, and keeps those too)."""
    path, value = parse_override(text)
    label = f"--set {text}"
    node: Any = recipe.data
    created = False
    for i, part in enumerate(path):
        if isinstance(node, list):
            _check_index(node, part, path, i, label)
        if i == len(path) - 1:
            break
        child = node[part] if _has(node, part) else None
        if isinstance(child, str) and isinstance(node, dict):  # bare component name
            if not _is_component_name(child):
                raise UserError(f"cannot set {format_path(path)}: {format_path(path[: i + 1])} is {child!r}, a value "
                                f"rather than a component, so it has no keys", file=label)
            child = node[part] = {"type": child}
            recipe.origins[path[: i + 1]] = recipe.origins[path[: i + 1] + ("type",)] = (label, None)  # blame the --set
        elif child is None:
            if not created:  # below a mapping this --set creates, the first one is the mistake to report
                _refuse_a_component_by_parts(node, path, i, text)
            created = True
            child = node[part] = {}
            recipe.origins[path[: i + 1]] = (label, None)  # a section or mapping this --set creates: blame the --set
        if not isinstance(child, (dict, list)):
            raise UserError(f"cannot set {format_path(path)}: {format_path(path[: i + 1])} is {child!r}, not a mapping",
                            file=label)
        node = child
    names = ("type", "_target_")  # one slot: a class path may replace a registered name, and back
    if (path[-1] in names and isinstance(node, dict) and any(k in node for k in names)
            and node.get(path[-1]) != value):  # another component: the recipe's keys for the old one go, as in a
        dropped = [k for k in node if k != path[-1] and (k in names or not _set_by_override(recipe, path[:-1] + (k,)))]
        for key in dropped:
            del node[key]  # _base_ merge; keys an earlier --set gave stay, whatever the order of the --sets
            for p in [p for p in recipe.origins if p[: len(path)] == path[:-1] + (key,)]:
                del recipe.origins[p]
        recipe.origins[path[:-1]] = (label, None)  # the component is this --set's now: what it lacks is blamed on it
    old = node[path[-1]] if _has(node, path[-1]) else None
    kept: dict = {}
    if isinstance(value, str) and isinstance(old, dict) and any(k in old for k in names) and _is_component_name(value):
        # `block=convnext` replaces the component whole, yet keeps what --sets put inside it, as `.type=` does
        kept = {k: v for k, v in old.items() if k not in names and _set_inside(recipe, path + (k,), path)}
    kept_origins = {p: o for p, o in recipe.origins.items() if len(p) > len(path) and p[len(path)] in kept
                    and p[: len(path)] == path}
    node[path[-1]] = value = {"type": value, **kept} if kept else value
    for p in [p for p in recipe.origins if p[: len(path)] == path]:
        del recipe.origins[p]
    recipe.origins[path] = (label, None)
    if isinstance(node, list):  # the list is checked whole (train.betas): what is wrong with it is this --set's
        recipe.origins[path[:-1]] = (label, None)
    for sub in _paths(value, path):
        recipe.origins[sub] = (label, None)
    recipe.origins.update(kept_origins)


def _set_inside(recipe: Recipe, path: KeyPath, component: KeyPath) -> bool:
    """Whether the value at ``path`` was given by a ``--set`` of a key inside ``component``
    (``--set model.block.kernel_size=3``), not by the recipe nor by a ``--set`` of the whole component."""
    label = recipe.origins.get(path, (None, None))[0]
    if not (isinstance(label, str) and label.startswith("--set ")):
        return False
    keys = override_key(label[len("--set "):])
    return len(keys) > len(component) and keys[: len(component)] == tuple(str(p) for p in component)


def _set_by_override(recipe: Recipe, path: KeyPath) -> bool:
    """Whether the value at ``path`` was given by a ``--set`` (not by the recipe file or its bases)."""
    label = recipe.origins.get(path, (None, None))[0]
    return isinstance(label, str) and label.startswith("--set ")


def _refuse_a_component_by_parts(owner: Any, path: KeyPath, i: int, text: str) -> None:
    """``--set model.head_norm.eps=1e-6`` where the recipe writes no ``head_norm``: a component
    made of some of its keys has no name, so the whole component has to be given."""
    part = path[i]
    if not isinstance(part, str) or path[i + 1:] in (("type",), ("_target_",)):
        return
    takes, default = _component_parameter(owner, part)
    if not takes:  # not a component the owner takes: the recipe check names what is wrong
        return
    where = format_path(path[: i + 1])
    keys = f"{path[-1]}: {text.partition('=')[2].strip()}"
    for key in reversed(path[i + 1:-1]):
        keys = f"{key}: {{{keys}}}"
    state = "null" if _has(owner, part) else "not written in the recipe (its default is used)"
    raise UserError(f"cannot set {format_path(path)}: {where} is {state}, so it has no keys to set",
                    file=f"--set {text}", suggestion=f'give it whole: --set "{where}={{type: {default or "NAME"}, {keys}}}"')


def _component_parameter(owner: Any, param: str) -> tuple[bool, str | None]:
    """Whether the component ``owner`` (``{type: NAME, ...}``) takes a component as ``param``, and
    the registered name of its default there, if it has one."""
    from zoo import registry
    from zoo.introspect import constructor_annotations, signature
    from zoo.validate import kind_of_param

    name = owner.get("type") if isinstance(owner, dict) else None
    kinds = [k for k in registry.KINDS if isinstance(name, str) and name in registry.names(k)]
    if len(kinds) != 1 or kind_of_param(param) is None:
        return False, None
    try:
        cls = registry.get(kinds[0], name)
        sig = signature(cls)
    except UserError:  # a plugin that does not load: the recipe check reports it
        return False, None
    if sig is None or param not in sig.parameters:
        return False, None
    kind = kind_of_param(param, constructor_annotations(cls).get(param, Any))
    if kind is None:  # qk_norm: bool
        return False, None
    names = registry.names_of(sig.parameters[param].default, (kind,))
    return True, min(names) if names else None


def _is_component_name(text: str) -> bool:
    """Whether ``text`` names a component: a registered name of any kind, or a diffusion objective."""
    from zoo import registry
    from zoo.diffusion.sections import OBJECTIVES

    return text in OBJECTIVES or any(text in registry.names(kind) for kind in registry.KINDS)


def _check_index(items: list, part: Any, path: KeyPath, i: int, label: str) -> None:
    """``part`` must be an index of ``items`` (the list at ``path[:i]``)."""
    if _has(items, part):
        return
    where = format_path(path[:i])
    valid = f"indices 0..{len(items) - 1}" if items else "no valid index"
    what = f"no item {part}" if isinstance(part, int) else f"{part!r} is not an index"
    raise UserError(f"cannot set {format_path(path)}: {what}; {where} is a list of {len(items)} ({valid})", file=label)


def _has(node: Any, key: Any) -> bool:
    if isinstance(node, list):
        return isinstance(key, int) and 0 <= key < len(node)
    return isinstance(node, dict) and key in node


def _paths(value: Any, path: KeyPath) -> Iterable[KeyPath]:
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, sub in items:
        yield path + (key,)
        yield from _paths(sub, path + (key,))


def _plain(value: Any) -> Any:
    """A recipe dict built in Python with numpy scalars (a sweep over ``np.arange``) as YAML would give it:
    ``np.int64(4)`` -> ``4``, ``np.float32(0.1)`` -> ``0.1``, ``np.bool_`` -> ``bool``, tuples as lists."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0:
        return _plain(value.item())
    return value


def mapping_overrides(values: Mapping[str, Any], prefix: str = "") -> list[str]:
    """``{"model.depth": 6}`` -> ``["model.depth=6"]``: plain values as ``--set`` overrides (each key after
    ``prefix``). Values are written as JSON, which YAML reads back unchanged; numpy scalars count as the
    numbers they hold (a sweep over ``np.arange``), as in a recipe dict; objects and NaN are refused."""

    texts = []
    for key, value in values.items():
        value = _plain(value)
        try:
            texts.append(f"{prefix}{key}={json.dumps(value, allow_nan=False)}")
        except TypeError:
            raise UserError(f"{key}={value!r}: an override must be plain data "
                            "(numbers, strings, lists, dicts)") from None
        except ValueError:  # NaN or an infinity, which json writes as a string YAML would read back
            raise UserError(f"{key}={value!r}: NaN and infinities are refused") from None
    return texts


def resolve(recipe: str | Path | dict | Recipe,
            overrides: Iterable[str] | Mapping[str, Any] | None = ()) -> Recipe:
    """Load a recipe (path, dict or :class:`Recipe`), apply its bases and the overrides
    (``["model.depth=6"]`` as ``--set`` takes them, or ``{"model.depth": 6}``)."""
    if isinstance(recipe, Recipe):
        resolved = Recipe(copy.deepcopy(recipe.data), dict(recipe.origins), recipe.source, dict(recipe.shown))
    elif isinstance(recipe, dict):
        resolved = _apply_bases(Recipe(_plain(copy.deepcopy(recipe))), Path.cwd(), ())
    elif not isinstance(recipe, (str, Path)):
        raise UserError(f"a recipe is a path, a recipe name or a dict, got {type(recipe).__name__}",
                        suggestion="e.g. zoo.build_model('dit_s_2') or zoo.build_model({'type': 'dit', ...})")
    else:
        path = find_recipe(recipe)
        resolved = load_file(path, str(recipe) if Path(recipe).is_file() else str(path))
    if overrides is None:
        overrides = ()
    elif isinstance(overrides, str):  # one "key=value" given where a list is expected
        overrides = [overrides]
    elif not isinstance(overrides, (Mapping, Iterable)):  # build_model("dit_s_2", 5): not "'int' is not iterable"
        raise UserError(f"overrides are a list of 'key=VALUE' texts or a mapping, got {type(overrides).__name__}",
                        suggestion="e.g. ['model.depth=6'] or {'model.depth': 6}")
    elif isinstance(overrides, Mapping):  # {"model.depth": 6}: each key was read as a "key=VALUE" text
        overrides = list(overrides.items())
    for text in overrides:
        if isinstance(text, tuple) and len(text) == 2 and isinstance(text[0], str):  # ("model.depth", 6)
            key, value = text
            text = mapping_overrides({key: value})[0]
            resolved.shown[f"--set {text}"] = f"override {{{key!r}: {_plain(value)!r}}}"  # no --set was given
        if not isinstance(text, str):
            raise UserError(f"an override is 'key=VALUE' text, got {text!r}",
                            suggestion="e.g. ['model.depth=6'] or {'model.depth': 6}")
        try:
            apply_override(resolved, text)
        except UserError as err:
            err.file = resolved.shown.get(err.file, err.file)
            raise
    return resolved


def resolve_recipe(recipe: str | Path | dict, overrides: Iterable[str] = ()) -> dict[str, Any]:
    """The fully resolved recipe as plain data (bases merged, overrides applied, not validated)."""
    return resolve(recipe, overrides).data
