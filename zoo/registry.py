"""One flat registry per kind of component, filled from entry points and a decorator.

Built-in components are declared in ``pyproject.toml`` under the entry-point groups in
:data:`GROUPS`, exactly as a third-party package declares its own, so both are found the
same way and nothing is imported until a name is resolved. :func:`register` adds
components defined in the running process (a script, a notebook, a test).

There are no scopes: a name means one class per kind. A name claimed twice is an error naming
both sources: at once for a decorator on an installed name, when it is used for two
distributions (or a plugin installed after the decorator ran); a plugin that fails to import is reported by name when it is resolved, and does
not affect any other name.
"""

from __future__ import annotations

import functools
import importlib
import re
import sys
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Callable, Collection, Iterator, TypeVar

from .errors import UserError, did_you_mean

GROUPS: dict[str, str] = {
    "block": "zoo.blocks",
    "conditioner": "zoo.conditioners",
    "backbone": "zoo.backbones",
    "solver": "zoo.solvers",
    "schedule": "zoo.schedules",
    "dataset": "zoo.datasets",
    "extractor": "zoo.extractors",
}
KINDS: tuple[str, ...] = tuple(GROUPS)
OWN_DISTRIBUTION = "zoo-diffusion"  # the built-in components are this distribution's entry points

T = TypeVar("T")


@dataclass
class Entry:
    """One registered name: where it comes from and how to load it (lazily)."""

    kind: str
    name: str
    source: str  # distribution name, or "in-process (module)"
    target: str  # "module:attribute"
    _loader: Callable[[], Any] = field(repr=False)
    conflicts: list["Entry"] = field(default_factory=list, repr=False)
    _loaded: Any = field(default=None, repr=False)

    def describe(self) -> str:
        """``"distribution zoo-diffusion (zoo.blocks.mlp:Mlp)"``: a source for error messages."""
        plain = self.source.startswith("in-process") or self.source == UNKNOWN_DISTRIBUTION
        where = self.source if plain else f"distribution {self.source}"
        return f"{where} ({self.target})"

    def load(self) -> Any:
        """Import and return the registered object; a failing import becomes a :class:`UserError`."""
        if self.conflicts:
            others = " and ".join(e.describe() for e in self.conflicts)
            raise UserError(
                f"{self.kind} {self.name!r} is registered twice: by {self.describe()} and by {others}",
                suggestion="uninstall or rename one of them",
            )
        if self._loaded is None:
            try:
                loaded = self._loader()
            except Exception as err:  # a plugin may fail in any way; report which one it was
                raise UserError(
                    f"{self.kind} {self.name!r} could not be loaded from {self.describe()} "
                    f"(entry point {GROUPS[self.kind]}: {self.name} = {self.target}): "
                    f"{type(err).__name__}: {err}"
                ) from err
            if not callable(loaded):  # checked before it is kept: a second load() must refuse it again
                raise UserError(f"{self.kind} {self.name!r} from {self.describe()} is not a class or callable")
            self._loaded = loaded
        return self._loaded

    def summary(self) -> str:
        """The first line of the object's docstring, or ``"error: ..."`` when it cannot be loaded."""
        try:
            doc = (self.load().__doc__ or "").strip()
        except UserError as err:
            return f"error: {err}"
        return doc.splitlines()[0] if doc else ""


_discovered: dict[str, dict[str, list[Entry]]] | None = None
_in_process: dict[str, dict[str, Entry]] = {kind: {} for kind in KINDS}


def refresh() -> None:
    """Forget discovered entry points (after installing a plugin or changing ``sys.path``)."""
    global _discovered
    _discovered = None
    importlib.invalidate_caches()


UNKNOWN_DISTRIBUTION = "unknown distribution"


def distribution_name(ep: Any) -> str:
    """The name of the distribution declaring entry point ``ep``; :data:`UNKNOWN_DISTRIBUTION` when its
    METADATA has none (``None`` on Python 3.11, a ``KeyError`` on newer ones): listing must not crash."""
    try:
        name = ep.dist.name if ep.dist is not None else None
    except Exception:  # a broken METADATA may fail in any way
        name = None
    return name if isinstance(name, str) and name else UNKNOWN_DISTRIBUTION


def distribution_version(name: str) -> str | None:
    """The installed version of distribution ``name``; ``None`` when it is not installed or has none."""
    from importlib import metadata

    try:
        version = metadata.version(name)
    except Exception:  # not installed, or a METADATA without Version
        return None
    return version if isinstance(version, str) and version else None


def _discover() -> dict[str, dict[str, list[Entry]]]:
    global _discovered
    if _discovered is None:
        found: dict[str, dict[str, list[Entry]]] = {}
        for kind, group in GROUPS.items():
            table: dict[str, list[Entry]] = found.setdefault(kind, {})
            for ep in entry_points(group=group):
                entry = Entry(kind, ep.name, distribution_name(ep), ep.value, ep.load)
                table.setdefault(ep.name, []).append(entry)
        _discovered = found
    return _discovered


_MISSING = object()


def _imported_object(target: str) -> Any:
    """The object ``"module:attr.path"`` names if its module is already imported, else :data:`_MISSING`
    (imports nothing: the module may be the one being imported right now)."""
    module_name, _, attrs = target.partition(":")
    obj = sys.modules.get(module_name, _MISSING)
    for attr in attrs.split(".") if attrs else ():
        obj = getattr(obj, attr, _MISSING)
    return obj


def _resolved_object(target: str) -> Any:
    """The object ``target`` names, importing its module if needed; :data:`_MISSING` when that fails."""
    try:
        importlib.import_module(target.partition(":")[0])
    except Exception:  # a broken plugin: load() reports it
        return _MISSING
    return _imported_object(target)


def _same_object(entry: Entry, obj: Any, target: str) -> bool:
    """Whether ``entry`` names ``obj`` (whose ``module:qualname`` is ``target``): a class re-exported by its
    package (``pkg:Block`` beside ``pkg.blocks:Block``) is one object reached by two paths, not two."""
    return entry.target == target or _resolved_object(entry.target) is obj


def _table(kind: str) -> dict[str, list[Entry]]:
    """Every name of ``kind`` with the entries claiming it (more than one is a conflict)."""
    kind = check_kind(kind)
    # snapshots: another thread may register or unregister meanwhile (iterating a dict that changes size raises)
    table = {name: list(entries) for name, entries in list(_discover()[kind].items())}
    for name, entry in list(_in_process[kind].items()):
        claims = table.setdefault(name, [])
        obj = entry._loader()
        if not any(_same_object(e, obj, entry.target) for e in claims):  # decorating an entry point's class is fine
            claims.append(entry)
    for claims in table.values():
        for entry in claims:
            entry.conflicts = [e for e in claims if e is not entry]
    return table


def check_kind(kind: str) -> str:
    """Return ``kind`` if it is a known kind (plural accepted), else raise a :class:`UserError`."""
    if not isinstance(kind, str):  # `@zoo.register` without its arguments hands over the class itself
        raise TypeError(f"the kind must be one of {', '.join(KINDS)}, got {kind!r}; "
                        f"decorate with @zoo.register(KIND) or @zoo.register(KIND, NAME)")
    if kind not in GROUPS and kind.endswith("s") and kind[:-1] in GROUPS:
        kind = kind[:-1]
    if kind not in GROUPS:
        raise UserError(f"unknown kind {kind!r}; kinds are {', '.join(KINDS)}", suggestion=did_you_mean(kind, KINDS))
    return kind


def names(kind: str) -> list[str]:
    """Sorted registered names of ``kind`` (imports nothing)."""
    return sorted(_table(kind))


class Names(Collection[str]):
    """The registered names of one kind, read each time it is used (a plugin installed later counts)."""

    def __init__(self, kind: str) -> None:
        self.kind = check_kind(kind)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in _table(self.kind)

    def __iter__(self) -> Iterator[str]:
        return iter(names(self.kind))

    def __len__(self) -> int:
        return len(_table(self.kind))


def entries(kind: str) -> list[Entry]:
    """Every entry of ``kind``, sorted by name (a conflicting name appears once per source)."""
    table = _table(kind)
    return [e for name in sorted(table) for e in table[name]]


def find(kind: str, name: str) -> Entry:
    """The entry for ``name`` (imports nothing); unknown names raise with close matches.

    A miss rescans the installed distributions once first: a plugin ``pip install``-ed after the first
    lookup (in a notebook) is found without restarting; names that are found cost no rescan."""
    table = _table(kind)
    if name not in table:
        refresh()
        table = _table(kind)
    if name not in table:
        known = ", ".join(sorted(table)) or "none"
        other = [k for k in KINDS if k != kind and name in _table(k)]  # adaln_zero asked for as a block
        raise UserError(
            f"unknown {kind} {name!r}; known {kind}s: {known}. Plugins add {kind}s through the "
            f"entry-point group {GROUPS[kind]!r} (or zoo.register({kind!r}) in the running process)",
            suggestion=f"{name!r} is a {other[0]}, not a {kind}" if other else did_you_mean(name, table),
        )
    return table[name][0]


def plugins_named(data: Any) -> dict[str, str]:
    """``{distribution: version}`` of the installed plugins ``data`` (a recipe) uses: those whose registered
    names occur in it, and those providing the top-level package of a ``_target_`` in it. That is what a
    checkpoint of it needs besides zoo; zoo's own names and in-process ones are left out."""
    words, targets = _recipe_strings(data)
    sources = {entry.source for kind in KINDS for name, claims in _discover()[kind].items() if name in words
               for entry in claims}
    sources |= _target_distributions(targets)
    sources -= {OWN_DISTRIBUTION, UNKNOWN_DISTRIBUTION}
    return {source: distribution_version(source) or "unknown" for source in sorted(sources)}


def _recipe_strings(data: Any) -> tuple[set[str], set[str]]:
    """Every string in ``data`` (nested mappings and lists), and the ``_target_`` values among them."""
    words: set[str] = set()
    targets: set[str] = set()
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
            if isinstance(item.get("_target_"), str):
                targets.add(item["_target_"])
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str):
            words.add(item)
    return words, targets


def _target_distributions(targets: set[str]) -> set[str]:
    """The distributions providing the top-level packages of ``_target_`` paths (``labplug.ConvNet``)."""
    if not targets:
        return set()
    from importlib.metadata import packages_distributions

    try:
        provided = packages_distributions()
    except Exception:  # a broken installed distribution must not stop a checkpoint being written
        return set()
    tops = {target.replace(":", ".").split(".")[0] for target in targets}
    found = {dist for top in tops for dist in provided.get(top, ()) if isinstance(dist, str) and dist}
    return {dist for dist in found if _normalised(dist) not in _own_requirements()}


def _normalised(name: str) -> str:
    """A distribution name as pip compares them (PEP 503: case and runs of -_. do not matter)."""
    return re.sub(r"[-_.]+", "-", name).lower()


@functools.lru_cache(maxsize=1)
def _own_requirements() -> frozenset[str]:
    """zoo's own dependencies (torch, timm, ...): a ``_target_: torch.nn.X`` needs no plugin besides zoo."""
    from importlib.metadata import requires

    try:
        wanted = requires(OWN_DISTRIBUTION) or []
    except Exception:  # zoo run from a source tree without its metadata
        return frozenset()
    return frozenset(_normalised(re.split(r"[\s;<>=!~\[(]", spec, maxsplit=1)[0]) for spec in wanted)


def get(kind: str, name: str) -> Any:
    """The class registered as ``name`` of ``kind``, imported on first use."""
    return find(kind, name).load()


def _snake_case(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()


def register(kind: str, name: str | None = None) -> Callable[[T], T]:
    """Class decorator registering a component of ``kind`` in this process.

    ``name`` defaults to the class name in snake case (``MyBlock`` -> ``my_block``).
    A name that an installed distribution (zoo itself included) already uses for another class
    is refused here, naming both: registered anyway, it would break that name for every recipe
    in the process. Registering the same class again (a module reload) is fine.
    """
    kind = check_kind(kind)
    if name is not None and (not isinstance(name, str) or not name.strip() or name != name.strip()):
        raise UserError(f"zoo.register({kind!r}, {name!r}): a component's name is a non-empty string without "
                        "surrounding spaces (recipes name it)", suggestion="pass a name like 'my_block', or none for "
                        "the class name in snake case")

    def decorator(obj: T) -> T:
        key = name or _snake_case(obj.__name__)  # type: ignore[attr-defined]
        target = f"{obj.__module__}:{obj.__qualname__}"  # type: ignore[attr-defined]
        old = _in_process[kind].get(key)
        if old is not None and old.target != target and old._loader() is not obj:
            raise UserError(
                f"{kind} {key!r} is registered twice in this process: by {old.target} and by {target}",
                suggestion="pick another name",
            )
        source = f"in-process ({obj.__module__})"  # type: ignore[attr-defined]
        taken = [e for e in _discover()[kind].get(key, []) if _claimed_by_another(e, obj, target)]
        if taken:
            raise UserError(f"{kind} {key!r} is already registered by {taken[0].describe()}; {target} cannot "
                            f"take its name", suggestion=f"pick another name, e.g. @zoo.register({kind!r}, "
                            f"'my_{key}')")
        _in_process[kind][key] = Entry(kind, key, source, target, lambda: obj)
        return obj

    return decorator


def _claimed_by_another(entry: Entry, obj: Any, target: str) -> bool:
    """Whether entry point ``entry`` names an object other than ``obj``, decided now where it can be.

    A module that is being imported (``pkg/__init__.py`` importing the decorated class to re-export
    it) cannot be asked yet: that case is left to lookup time, where :func:`_table` compares objects."""
    if entry.target == target:
        return False
    module_name = entry.target.partition(":")[0]
    found = _imported_object(entry.target)
    if found is _MISSING and module_name in sys.modules:
        return False  # partly imported: decided at lookup
    if found is _MISSING:
        found = _resolved_object(entry.target)
    return found is not obj


def names_of(obj: Any, kinds: Collection[str] = KINDS) -> set[str]:
    """The names ``obj`` is registered under among ``kinds``, by identity (a class may be named by its
    package or its module); imports nothing beyond what is already imported."""
    target = f"{getattr(obj, '__module__', '')}:{getattr(obj, '__qualname__', '')}"
    found = set()
    for kind in kinds:
        for name, claims in _discover()[kind].items():
            if any(e.target == target or _imported_object(e.target) is obj for e in claims):
                found.add(name)
        found |= {name for name, e in list(_in_process[kind].items()) if e._loader() is obj}
    return found


def is_registered(obj: Any) -> bool:
    """Whether ``obj`` is a registered component of any kind (see :func:`names_of`)."""
    return bool(names_of(obj))


def unregister(kind: str, name: str) -> None:
    """Remove an in-process registration (tests, notebooks re-running a cell)."""
    _in_process[check_kind(kind)].pop(name, None)
