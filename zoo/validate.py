"""Check a recipe against the constructors it names, before anything is built.

Every component ``{type: NAME, ...}`` (or bare ``NAME``) is looked up in its kind, and
each key must be a parameter of the class's constructor (``inspect.signature``; a class
taking ``**kwargs`` accepts anything) with a value of the annotated type where that is
cheap to check. A typo is an error with file, line, key path and a close match, never a
silently ignored option.

What is valid becomes a tree of :class:`Factory` objects (``functools.partial`` of the
registered class): nested components stay factories for their parent to call with what
only the parent knows; the caller instantiates the top one. A parameter annotated with
:class:`~zoo.domains.Calls` says what its parent passes: those arguments may be missing from
the component and must be ones it takes. Without it, ``dim``, ``num_heads``, ``cond_dim`` and
``hidden_features`` may be missing.

Which kind a nested value is: a parameter named ``block`` or ``mlp`` takes a block;
``norm``, ``conditioner`` or ``*_norm`` a conditioner; ``schedule`` and ``solver`` their
kinds, unless its annotation says plain data (``qk_norm: bool`` takes a bool); any other
mapping with ``type:`` is looked up across kinds (the name must be unique).
A list whose items have ``type:`` is a list of components; a mapping (or list of mappings)
for a parameter annotated with a dataclass is checked against its fields and becomes one.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import typing
from typing import Any, Callable, Iterable, Literal

from . import registry
from .domains import Calls, NonEmpty, OneOf, Required, constraints_of, describe, fits, non_finite, options, split, strip
from .errors import UserError, did_you_mean
from .introspect import (check_type, constructor_annotations, dataclass_in, is_factory_type, item_annotation,
                         positional_names, signature, type_name)
from .recipe import KeyPath, Recipe, format_path

TARGET_KEY = "_target_"  # Hydra-style {_target_: pkg.module.Class, ...}: a class by import path
PARENT_SUPPLIED = frozenset({"dim", "num_heads", "cond_dim", "hidden_features"})
SECTIONS = ("model", "diffusion", "data", "train", "sample")

SectionValidator = Callable[[Any, Recipe], None]
#: The key tables of sections that have one (``{key: annotation}``), for ``zoo list --verbose``.
SECTION_TABLES: dict[str, dict[str, Any]] = {}
#: Validators of top-level sections, ``validator(section_value, recipe)`` raising ``recipe.error(...)``.
#: Modules owning a section add theirs here; adding one for a new name makes that section legal.
SECTION_VALIDATORS: dict[str, SectionValidator] = {}


class Factory(functools.partial):
    """A registered class with its recipe arguments bound, remembering which recipe key it is.

    Unlike a bare ``partial``, an argument given both by the recipe and by the parent is an
    error (a bare ``partial`` lets the parent's keyword silently win), and an exception
    raised while building gets a note naming the recipe key.
    """

    key_path: str = "<unknown>"
    origin: tuple = ("<unknown>", None)
    locate_key: Callable[[str], tuple] | None = None  # the recipe's file and line of a key path, where known

    def __call__(self, /, *args: Any, **kwargs: Any) -> Any:
        file, line = self.origin
        clash = sorted(set(kwargs).union(positional_names(self.func, len(args))) & self.keywords.keys())
        if clash:  # located where the key was given: its own line, or the --set that added it
            where = (self.locate_key and self.locate_key(f"{self.key_path}.{clash[0]}")) or self.origin
            raise UserError(f"{', '.join(clash)} is set by the component that builds this one; the recipe may not set it",
                            file=where[0], line=where[1], key_path=self.key_path, suggestion=f"remove {clash[0]} here")
        self._check_constraints(args, kwargs)
        try:
            return super().__call__(*args, **kwargs)
        except UserError as err:  # a constructor's refusal: point at the recipe line it is about
            where = self.locate_key(err.key_path) if self.locate_key and err.key_path else None
            where = where or self.origin
            if err.file is None and err.line is None and not str(where[0]).startswith("<"):  # a file or a --set
                err.locate(*where, self.key_path or None)
            raise
        except Exception as err:
            add_note(err, f"while building {self.key_path} from {file}" + (f":{line}" if line else ""))
            raise

    def _check_constraints(self, args: tuple, kwargs: dict) -> None:
        """The component's declared rules (``constraints``) once the parent's arguments are known too: the
        recipe's check skipped a rule of a parent-supplied field (``Divisible("dim", "groups")`` of a plugin
        norm), and a value breaking it was the constructor's traceback, or built something else silently."""
        given = {**self.keywords, **kwargs, **dict(zip(positional_names(self.func, len(args)), args))}
        for rule in constraints_of(self.func):
            problem = rule.check(given)
            if problem:
                parent = [f for f in rule.fields if f not in self.keywords]
                where = (self.locate_key and next(filter(None, (self.locate_key(f"{self.key_path}.{f}")
                                                                for f in rule.fields if f in self.keywords)), None))
                where = where or self.origin
                raise UserError(problem + (f" ({', '.join(parent)} set by the component that builds this one)"
                                           if parent else ""),
                                file=None if str(where[0]).startswith("<") else where[0], line=where[1],
                                key_path=self.key_path, suggestion=f"rules of {self.key_path}: "
                                + "; ".join(r.describe() for r in constraints_of(self.func)))


def _place(factory: Factory, recipe: Recipe, path: KeyPath) -> None:
    """Tell ``factory`` which recipe key it builds, and how to find the line of any other key."""
    factory.key_path, factory.origin = format_path(path), recipe.origin(path)
    factory.locate_key = recipe.origin_of


def add_note(err: BaseException, note: str) -> None:
    """``err.add_note(note)``; on Python 3.10, which has no add_note, the same ``__notes__`` list by hand
    (3.10's tracebacks do not print it)."""
    if hasattr(err, "add_note"):
        err.add_note(note)
    else:
        err.__notes__ = [*getattr(err, "__notes__", []), note]


PLAIN_DATA = (bool, int, float, str, list, tuple, dict)


def takes_plain_data(ann: Any) -> bool:
    """Whether the annotation ``ann`` (domains and ``None`` aside) takes only plain data: ``bool``,
    ``int | None``, ``Literal["a", "b"]``, ``list[int]``; not ``Any``, a factory or a class."""
    members = [strip(a) for a in options(ann) if strip(a) is not type(None)]
    return bool(members) and all(typing.get_origin(a) is Literal or (typing.get_origin(a) or a) in PLAIN_DATA
                                 for a in members)


def kind_of_param(name: str, ann: Any = Any) -> str | None:
    """The registry kind a parameter named ``name`` takes, if its name says so and its annotation
    ``ann`` does not say otherwise (a plugin's ``qk_norm: bool`` is a switch, not a conditioner)."""
    if takes_plain_data(ann):
        return None
    if name in ("block", "mlp"):
        return "block"
    if name in ("norm", "conditioner") or name.endswith("_norm"):
        return "conditioner"
    if name in ("schedule", "solver"):
        return name
    return None


def resolve_component(recipe: Recipe, kind: str | None, spec: Any, path: KeyPath,
                      supplied: Iterable[str] | Calls = PARENT_SUPPLIED) -> Factory:
    """Check one component spec (``NAME`` or ``{type: NAME, ...}``) and return its factory.

    ``kind=None`` looks the name up across kinds. Required constructor parameters may be
    missing only if the caller passes them: named in ``supplied``, or, for a :class:`Calls`,
    among its leading positional and keyword arguments (which the class must then accept).
    """
    if isinstance(spec, str):
        name, kwargs, name_path = spec, {}, path
    elif isinstance(spec, dict):
        if TARGET_KEY in spec:
            return resolve_target(recipe, kind, spec, path, supplied)
        if "type" not in spec:
            raise recipe.error(path, f"a {kind or 'component'} needs a name", suggestion="add type: NAME")
        name, name_path = spec["type"], path + ("type",)
        kwargs = {k: v for k, v in spec.items() if k != "type"}
    else:
        raise recipe.error(path, f"expected a {kind or 'component'} name or {{type: NAME, ...}}, got {spec!r}")
    if not isinstance(name, str):
        raise recipe.error(name_path, f"a component name must be a string, got {name!r}")
    try:
        kind = kind or _kind_of_name(name)
        entry = registry.find(kind, name)
        cls = entry.load()
        _require_module_class(kind, cls, f"{kind} {name!r} from {entry.describe()}")
    except UserError as err:
        raise err.locate(*recipe.origin(name_path), format_path(name_path))
    what = f"{kind} {name!r} ({entry.target})"
    factory = Factory(cls, **resolve_kwargs(recipe, cls, kwargs, path, what, _supplied(recipe, cls, supplied, path, what)))
    _place(factory, recipe, path)
    return factory


# Kinds whose components become submodules of a backbone: a class registered there must be an nn.Module
# (a function returning one is taken as it is).
MODULE_KINDS = ("block", "conditioner")


def _require_module_class(kind: str | None, cls: Any, what: str) -> None:
    """A class of a module kind that is not an ``nn.Module``: refused now, not by PyTorch mid-build."""
    from torch import nn

    if kind in MODULE_KINDS and isinstance(cls, type) and not issubclass(cls, nn.Module):
        raise UserError(f"{what} is a class but not an nn.Module subclass; a {kind} becomes a submodule of the model",
                        suggestion=f"derive {cls.__qualname__} from torch.nn.Module")


def _supplied(recipe: Recipe, cls: Any, supplied: Iterable[str] | Calls, path: KeyPath, what: str) -> frozenset:
    """The arguments the caller passes to ``cls``; a :class:`Calls` the class cannot take is the recipe's error."""
    if not isinstance(supplied, Calls):
        return frozenset(supplied)
    sig = signature(cls)
    if sig is None:
        return frozenset(supplied.keywords)
    params = sig.parameters.values()
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params)
    takes_more = any(p.kind is p.VAR_POSITIONAL for p in params)
    named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    parent = next((str(p) for p in reversed(path) if isinstance(p, str)), "component")
    call = supplied.call_text()
    unknown = [] if takes_any else [k for k in supplied.keywords if k not in named]
    if unknown or (len(positional) < supplied.positional and not takes_more):
        lacks = (f"does not take {', '.join(unknown)}" if unknown
                 else f"takes fewer than {supplied.positional} positional arguments")
        raise recipe.error(path, f"{what} does not fit here: it is built as {parent}({call}), and it {lacks}",
                           suggestion=f"use a {parent} that takes {', '.join(unknown) or 'them'}")
    return frozenset(positional[:supplied.positional]) | frozenset(supplied.keywords)


def resolve_kwargs(recipe: Recipe, cls: Any, kwargs: dict, path: KeyPath, what: str,
                   supplied: frozenset = frozenset()) -> dict[str, Any]:
    """Check ``kwargs`` against ``cls``'s constructor; return them with nested components resolved."""
    sig = signature(cls)
    if sig is None:  # no introspectable signature: pass through unchecked
        return dict(kwargs)
    params = sig.parameters
    named = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    hints = constructor_annotations(cls)
    out = {}
    for key, value in kwargs.items():
        if key not in named and not takes_any:
            raise recipe.error(path + (key,), f"unknown parameter {key!r} of {what}; its parameters are "
                               f"{', '.join(named) or 'none'}", suggestion=did_you_mean(key, named))
        out[key] = resolve_value(recipe, key, value, hints.get(key, Any), path + (key,))
    missing = [n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and n not in kwargs
               and n not in supplied and (p.default is p.empty or _empty_default_of_non_empty(p.default, hints.get(n)))]
    if missing:
        raise recipe.error(path, f"{what} needs {', '.join(missing)}", suggestion=f"add {missing[0]}: VALUE")
    check_constraints(recipe, cls, {n: p.default for n, p in params.items() if p.default is not p.empty} | out,
                      kwargs, path)
    return out


def _empty_default_of_non_empty(default: Any, annotation: Any) -> bool:
    """A default that its own annotation refuses (DiMR's ``branches=()``, ``NonEmpty``): the recipe must give it."""
    return annotation is not None and NonEmpty in split(annotation)[1] and default is not None and not default


def check_constraints(recipe: Recipe, cls: Any, args: dict, given: Iterable[str], path: KeyPath) -> None:
    """The rules between arguments that ``cls`` declares (``constraints``), on defaults + recipe values.

    The error points at the first key of the rule the recipe sets (else at the component).
    """
    for rule in constraints_of(cls):
        problem = rule.check(args)
        if problem:
            keys = [f for f in rule.fields if f in given]
            overridden = [where for f in keys if (where := _override_under(recipe, path + (f,)))]
            if overridden:  # the --set itself (model.branches.0.block.num_heads=7, not the file's block: line)
                raise recipe.error(overridden[0], problem)
            # else the key the recipe file itself writes, before one it inherits from a _base_ (num_heads: 5 in
            # a child of dit_s_2 was blamed on the shipped file's hidden_size line)
            own = [f for f in keys if recipe.origins.get(path + (f,), ("",))[0] == recipe.source]
            key = (own or keys or [None])[0]
            raise recipe.error(path + ((key,) if key is not None else ()), problem)


def _override_under(recipe: Recipe, path: KeyPath) -> KeyPath | None:
    """The key at or under ``path`` that ``--set`` gave (the likelier culprit of a broken rule), if any."""
    return next((key for key, origin in recipe.origins.items()
                 if key[:len(path)] == path and str(origin[0]).startswith("--set")), None)


# --- section tables -------------------------------------------------------------------------------
#
# A section (or a mapping inside one) is a table ``{key: annotation}``: the annotation is a type
# with its domains (``Annotated[int, Range(1, MAX_BATCH)]``), ``Required`` if the key must be
# present, a nested table (a dict) for a mapping of its own, or ``Component(kind)``.


@dataclasses.dataclass(frozen=True)
class Component:
    """A section key that takes a registered component of ``kind`` (checked against its constructor)."""

    kind: str


def register_section(name: str, table: dict[str, Any], validator: SectionValidator | None = None) -> None:
    """Make top-level section ``name`` legal: checked against its key ``table``, or by ``validator``
    (which then runs :func:`check_table` itself and adds the rules between keys)."""
    SECTION_TABLES[name] = table
    SECTION_VALIDATORS[name] = validator or (lambda value, recipe: check_table(recipe, value, table, (name,), name))


def check_table(recipe: Recipe, value: Any, table: dict[str, Any], path: KeyPath, what: str) -> None:
    """Check a mapping against ``table``: no unknown keys, required keys present, each value in its domain."""
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise recipe.error(path, f"{what} must be a mapping, got {_show(value)}")
    for key in value:
        if key not in table:
            raise recipe.error(path + (key,), f"unknown key {key!r} in {what}; its keys are {', '.join(table)}",
                               suggestion=did_you_mean(str(key), table))
    for key, ann in table.items():
        kpath = path + (key,)
        if key not in value:
            if Required in split(ann)[1]:
                raise recipe.error(path, f"{what} needs {key}: {describe(ann)}", suggestion=f"add {key}: VALUE")
        elif isinstance(ann, dict):
            check_table(recipe, value[key], ann, kpath, f"{format_path(kpath)}")
        elif isinstance(ann, Component):
            resolve_component(recipe, ann.kind, value[key], kpath, supplied=())
        elif not fits(value[key], ann):
            raise domain_error(recipe, kpath, value[key], ann)


def table_rows(table: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """``(key, what it allows)`` for every key of a section table, nested tables flattened."""
    rows = []
    for key, ann in table.items():
        if isinstance(ann, dict):
            rows += table_rows(ann, f"{prefix}{key}.")
        elif isinstance(ann, Component):
            rows.append((prefix + key, f"a {ann.kind} component"))
        else:
            rows.append((prefix + key, describe(ann)))
    return rows


def resolve_value(recipe: Recipe, name: str | None, value: Any, ann: Any, path: KeyPath) -> Any:
    """One constructor argument: a component, a dataclass, a list of either, or plain checked data."""
    kind = kind_of_param(name, ann) if name else None
    if value is None and kind and type(None) not in map(strip, options(ann)):
        raise recipe.error(path, f"{name} takes a {kind}; null leaves none", suggestion=f"give a {kind} name (zoo list {kind})")
    if value is not None and (kind or is_component_spec(value)
                              or (isinstance(value, str) and is_factory_type(ann))):
        calls = next((m for m in split(ann)[1] if isinstance(m, Calls)), None)
        return resolve_component(recipe, kind, value, path, supplied=PARENT_SUPPLIED if calls is None else calls)
    record = dataclass_in(ann)
    if record is not None and isinstance(value, dict):
        return _build_record(recipe, record, value, path)
    nullable = type(None) in map(strip, options(ann))
    if record is not None and not isinstance(value, record) and not (value is None and nullable):  # e.g. a branch
        keys = ", ".join(f.name for f in dataclasses.fields(record))
        got = "null" if value is None else f"{type(value).__name__} {_show(value)}"
        needed = [f.name for f in dataclasses.fields(record)
                  if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        raise recipe.error(path, f"expected a mapping of {keys}, got {got}",
                           suggestion="give one as {" + ", ".join(f"{k}: ..." for k in needed or [keys.split(", ")[0]])
                           + "}")
    if isinstance(value, list):
        item_ann = item_annotation(ann)
        if dataclass_in(item_ann) or any(is_component_spec(v) for v in value):
            return [resolve_value(recipe, None, v, item_ann, path + (i,)) for i, v in enumerate(value)]
    if not check_type(value, ann):
        raise recipe.error(path, f"expected {type_name(ann)}, got {type(value).__name__} {value!r}")
    if not fits(value, ann):
        raise domain_error(recipe, path, value, ann)
    return value


def domain_error(recipe: Recipe, path: KeyPath, value: Any, ann: Any) -> UserError:
    """``KEY must be <what ann allows>, got VALUE`` located at ``path`` (to raise)."""
    name = next((str(p) for p in reversed(path) if isinstance(p, str)), "value")
    shown = _show(value)
    hint = None
    choice = next((m for m in split(ann)[1] if isinstance(m, OneOf)), None)
    if choice is not None:
        hint = did_you_mean(str(value), list(choice.choices))
    elif _has_non_finite(value):
        hint = "NaN and infinities are refused"
    return recipe.error(path, f"{name} must be {describe(ann)}, got {shown}", suggestion=hint)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _has_non_finite(value: Any) -> bool:
    if isinstance(value, dict):
        return any(_has_non_finite(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_non_finite(v) for v in value)
    return non_finite(value)


def refuse_non_finite(recipe: Recipe, value: Any, path: KeyPath) -> None:
    """Every float in ``value`` (YAML ``.nan``, ``.inf``, ``1e999``) must be finite, whatever takes it."""
    if isinstance(value, dict):
        for k, v in value.items():
            refuse_non_finite(recipe, v, path + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            refuse_non_finite(recipe, v, path + (i,))
    elif non_finite(value):
        name = next((str(p) for p in reversed(path) if isinstance(p, str)), "value")
        raise recipe.error(path, f"{name} must be a finite number, got {value!r}",
                           suggestion="NaN and infinities are refused")


def is_component_spec(value: Any) -> bool:
    """Whether ``value`` names a component: a mapping with ``type:`` or ``_target_:``."""
    return isinstance(value, dict) and ("type" in value or TARGET_KEY in value)


def resolve_target(recipe: Recipe, kind: str | None, spec: dict, path: KeyPath,
                   supplied: Iterable[str] | Calls = PARENT_SUPPLIED) -> Factory:
    """``{_target_: pkg.module.Class, ...}`` (Hydra style): import the module, check the class and its kwargs.

    The class must be an ``nn.Module`` or a registered component; its arguments are checked exactly
    like a registered name's.
    """
    target, target_path = spec[TARGET_KEY], path + (TARGET_KEY,)
    if "type" in spec:
        raise recipe.error(path, f"give type or {TARGET_KEY}, not both", suggestion=f"remove type or {TARGET_KEY}")
    module_name, _, attr = target.replace(":", ".").rpartition(".") if isinstance(target, str) else ("", "", "")
    if not module_name or not attr:
        raise recipe.error(target_path, f"{TARGET_KEY} must be a dotted path pkg.module.Class, got {target!r}")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except Exception as err:  # any import failure is the recipe's to fix
        raise recipe.error(target_path, f"cannot import {TARGET_KEY} {target!r}: {type(err).__name__}: {err}") from None
    from torch import nn

    if not (isinstance(cls, type) and issubclass(cls, nn.Module)) and not registry.is_registered(cls):
        raise recipe.error(target_path, f"{TARGET_KEY} {target!r} is not an nn.Module subclass nor a registered component")
    try:
        _require_module_class(kind, cls, f"{TARGET_KEY} {target!r}")
    except UserError as err:
        raise err.locate(*recipe.origin(target_path), format_path(target_path))
    kwargs = {k: v for k, v in spec.items() if k != TARGET_KEY}
    what = f"{kind or 'component'} {target!r}"
    factory = Factory(cls, **resolve_kwargs(recipe, cls, kwargs, path, what, _supplied(recipe, cls, supplied, path, what)))
    _place(factory, recipe, path)
    return factory


def _build_record(recipe: Recipe, record: type, value: dict, path: KeyPath) -> Any:
    kwargs = resolve_kwargs(recipe, record, value, path, f"{record.__name__}")
    try:
        return record(**kwargs)
    except (TypeError, ValueError) as err:
        raise recipe.error(path, f"invalid {record.__name__}: {err}") from None


def _kind_of_name(name: str) -> str:
    kinds = [k for k in registry.KINDS if name in registry.names(k)]
    if len(kinds) == 1:
        return kinds[0]
    if kinds:
        raise UserError(f"{name!r} is registered as {' and '.join(kinds)}; this parameter cannot tell which is meant")
    everything = [n for k in registry.KINDS for n in registry.names(k)]
    raise UserError(f"unknown component {name!r}; plugins add components through the entry-point groups "
                    f"{', '.join(registry.GROUPS.values())}", suggestion=did_you_mean(name, everything))


# --- sections -------------------------------------------------------------------------------------


def model_factory(recipe: Recipe) -> Factory:
    """The checked factory of the recipe's ``model`` section (a backbone; every argument required)."""
    if recipe.data.get("model") is None:
        raise recipe.error(("model",), "the recipe has no model section", suggestion="add model: {type: NAME, ...}")
    factory = resolve_component(recipe, "backbone", recipe.data["model"], ("model",), supplied=())
    refuse_non_finite(recipe, recipe.data["model"], ("model",))  # also where no annotation takes the value
    return factory


# Modules whose section validators add themselves to SECTION_VALIDATORS when imported. They
# import this module, so they are loaded on first use rather than at the top (no import circle).
SECTION_MODULES: tuple[str, ...] = ("zoo.diffusion.sections", "zoo.training.sections")


def _load_section_validators() -> None:
    for name in SECTION_MODULES:
        importlib.import_module(name)


def validate_recipe(recipe: Recipe, sections: Iterable[str] | None = None) -> None:
    """Check the top-level sections and run the validator of each one present (all, or ``sections``)."""
    _load_section_validators()
    allowed = list(SECTIONS) + [s for s in SECTION_VALIDATORS if s not in SECTIONS]
    for key in recipe.data:
        if key not in allowed:
            hint = did_you_mean(key, allowed)
            if not hint and not recipe.data.keys() & set(allowed):  # {"input_size": 8, ...}: a model section alone
                hint = "a model section alone names its backbone: add type: NAME (zoo list backbone) or _target_"
            raise recipe.error((key,), f"unknown section {key!r}; sections are {', '.join(allowed)}", suggestion=hint)
    for key, value in sorted(recipe.data.items(), key=lambda item: item[0] != "model"):  # model first: the
        # other sections' checks read it (a coefficient per DiMR branch), so its own mistake is the one to name
        if sections is not None and key not in sections:
            continue
        if key != "model" and value is not None and not isinstance(value, dict):
            raise recipe.error((key,), f"section {key!r} must be a mapping, got {type(value).__name__}")
        if key in SECTION_VALIDATORS:
            SECTION_VALIDATORS[key](value, recipe)
        refuse_non_finite(recipe, value, (key,))  # also where no table takes the value


def _validate_model(value: Any, recipe: Recipe) -> None:
    model_factory(recipe)


SECTION_VALIDATORS["model"] = _validate_model
