"""Check a recipe against the constructors it names, before anything is built.

Every component ``{type: NAME, ...}`` (or bare ``NAME``) is looked up in its kind, and
each key must be a parameter of the class's constructor (``inspect.signature``; a class
taking ``**kwargs`` accepts anything) with a value of the annotated type where that is
cheap to check. A typo is an error with file, line, key path and a close match, never a
silently ignored option.

What is valid becomes a tree of :class:`Factory` objects (``functools.partial`` of the
registered class): nested components stay factories for their parent to call with what
only the parent knows (``dim``, ``num_heads``, ``cond_dim``, ``hidden_features`` may
therefore be missing from them); the caller instantiates the top one.

Which kind a nested value is: a parameter named ``block`` or ``mlp`` takes a block;
``norm``, ``conditioner`` or ``*_norm`` a conditioner; ``schedule`` and ``solver`` their
kinds; any other mapping with ``type:`` is looked up across kinds (the name must be unique).
A list whose items have ``type:`` is a list of components; a mapping (or list of mappings)
for a parameter annotated with a dataclass is checked against its fields and becomes one.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import importlib
import inspect
import sys
import types
import typing
from typing import Any, Callable, Iterable

from . import registry
from .errors import UserError, did_you_mean
from .recipe import KeyPath, Recipe, format_path

PARENT_SUPPLIED = frozenset({"dim", "num_heads", "cond_dim", "hidden_features"})
SECTIONS = ("model", "diffusion", "data", "train", "sample")

SectionValidator = Callable[[Any, Recipe], None]
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

    def __call__(self, /, *args: Any, **kwargs: Any) -> Any:
        file, line = self.origin
        clash = sorted(set(kwargs).union(_positional_names(self.func, len(args))) & self.keywords.keys())
        if clash:
            raise UserError(f"{', '.join(clash)} is set by the component that builds this one; the recipe may not set it",
                            file=file, line=line, key_path=self.key_path, suggestion=f"remove {clash[0]} here")
        try:
            return super().__call__(*args, **kwargs)
        except Exception as err:
            err.add_note(f"while building {self.key_path} from {file}" + (f":{line}" if line else ""))
            raise


def kind_of_param(name: str) -> str | None:
    """The registry kind a parameter named ``name`` takes, if its name says so."""
    if name in ("block", "mlp"):
        return "block"
    if name in ("norm", "conditioner") or name.endswith("_norm"):
        return "conditioner"
    if name in ("schedule", "solver"):
        return name
    return None


def resolve_component(recipe: Recipe, kind: str | None, spec: Any, path: KeyPath,
                      supplied: Iterable[str] = PARENT_SUPPLIED) -> Factory:
    """Check one component spec (``NAME`` or ``{type: NAME, ...}``) and return its factory.

    ``kind=None`` looks the name up across kinds. Required constructor parameters may be
    missing only if named in ``supplied`` (what the caller will pass).
    """
    if isinstance(spec, str):
        name, kwargs, name_path = spec, {}, path
    elif isinstance(spec, dict):
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
    except UserError as err:
        raise err.locate(*recipe.origin(name_path), format_path(name_path))
    what = f"{kind} {name!r} ({entry.target})"
    factory = Factory(cls, **resolve_kwargs(recipe, cls, kwargs, path, what, frozenset(supplied)))
    factory.key_path, factory.origin = format_path(path), recipe.origin(path)
    return factory


def resolve_kwargs(recipe: Recipe, cls: Any, kwargs: dict, path: KeyPath, what: str,
                   supplied: frozenset = frozenset()) -> dict[str, Any]:
    """Check ``kwargs`` against ``cls``'s constructor; return them with nested components resolved."""
    sig = _signature(cls)
    if sig is None:  # no introspectable signature: pass through unchecked
        return dict(kwargs)
    params = sig.parameters
    named = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    hints = _annotations(cls)
    out = {}
    for key, value in kwargs.items():
        if key not in named and not takes_any:
            raise recipe.error(path + (key,), f"unknown parameter {key!r} of {what}; its parameters are "
                               f"{', '.join(named) or 'none'}", suggestion=did_you_mean(key, named))
        out[key] = resolve_value(recipe, key, value, hints.get(key, Any), path + (key,))
    missing = [n for n, p in params.items() if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
               and n not in kwargs and n not in supplied]
    if missing:
        raise recipe.error(path, f"{what} needs {', '.join(missing)}", suggestion=f"add {missing[0]}: VALUE")
    return out


def resolve_value(recipe: Recipe, name: str | None, value: Any, ann: Any, path: KeyPath) -> Any:
    """One constructor argument: a component, a dataclass, a list of either, or plain checked data."""
    kind = kind_of_param(name) if name else None
    if value is not None and (kind or (isinstance(value, dict) and "type" in value)
                              or (isinstance(value, str) and _is_factory_type(ann))):
        return resolve_component(recipe, kind, value, path)
    record = _dataclass_in(ann)
    if record is not None and isinstance(value, dict):
        return _build_record(recipe, record, value, path)
    if isinstance(value, list):
        item_ann = _item_annotation(ann)
        if _dataclass_in(item_ann) or any(isinstance(v, dict) and "type" in v for v in value):
            return [resolve_value(recipe, None, v, item_ann, path + (i,)) for i, v in enumerate(value)]
    if not check_type(value, ann):
        raise recipe.error(path, f"expected {type_name(ann)}, got {type(value).__name__} {value!r}")
    return value


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
    return resolve_component(recipe, "backbone", recipe.data["model"], ("model",), supplied=())


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
            raise recipe.error((key,), f"unknown section {key!r}; sections are {', '.join(allowed)}",
                               suggestion=did_you_mean(key, allowed))
    for key, value in recipe.data.items():
        if sections is not None and key not in sections:
            continue
        if key != "model" and value is not None and not isinstance(value, dict):
            raise recipe.error((key,), f"section {key!r} must be a mapping, got {type(value).__name__}")
        if key in SECTION_VALIDATORS:
            SECTION_VALIDATORS[key](value, recipe)


def _validate_model(value: Any, recipe: Recipe) -> None:
    model_factory(recipe)


SECTION_VALIDATORS["model"] = _validate_model


# --- introspection ----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _signature(obj: Any) -> inspect.Signature | None:
    try:
        return inspect.signature(obj)
    except (TypeError, ValueError):
        return None


def _positional_names(obj: Any, count: int) -> list[str]:
    sig = _signature(obj)
    if sig is None or not count:
        return []
    positional = [n for n, p in sig.parameters.items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return positional[:count]


@functools.lru_cache(maxsize=None)
def _annotations(obj: Any) -> dict[str, Any]:
    """Evaluated constructor annotations; ones that cannot be evaluated are left out (unchecked)."""
    target = obj if dataclasses.is_dataclass(obj) or not isinstance(obj, type) else obj.__init__
    try:
        return typing.get_type_hints(target)
    except Exception:
        pass
    namespace = vars(sys.modules.get(getattr(obj, "__module__", ""), types.ModuleType("_")))
    out = {}
    for key, ann in getattr(target, "__annotations__", {}).items():
        try:
            out[key] = eval(ann, namespace) if isinstance(ann, str) else ann  # what get_type_hints does, per name
        except Exception:
            continue
    return out


def _options(ann: Any) -> tuple:
    """The members of a Union / Optional, or ``(ann,)``."""
    if typing.get_origin(ann) in (typing.Union, types.UnionType):
        return typing.get_args(ann)
    return (ann,)


def _dataclass_in(ann: Any) -> type | None:
    return next((a for a in _options(ann) if isinstance(a, type) and dataclasses.is_dataclass(a)), None)


def _item_annotation(ann: Any) -> Any:
    for option in _options(ann):
        if typing.get_origin(option) in (list, tuple, collections.abc.Sequence) and typing.get_args(option):
            return typing.get_args(option)[0]
    return Any


def _is_factory_type(ann: Any) -> bool:
    return any(a is type or typing.get_origin(a) in (type, collections.abc.Callable) or a is collections.abc.Callable
               for a in _options(ann))


def check_type(value: Any, ann: Any) -> bool:
    """Whether ``value`` (as YAML gives it) fits ``ann``; annotations not worth checking pass."""
    origin = typing.get_origin(ann)
    if origin in (typing.Union, types.UnionType):
        return any(check_type(value, a) for a in typing.get_args(ann))
    if ann is type(None) or ann is None:
        return value is None
    if ann is bool:
        return isinstance(value, bool)
    if ann is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if ann is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if ann is str:
        return isinstance(value, str)
    if origin is typing.Literal:
        return value in typing.get_args(ann)
    if ann in (list, tuple) or origin in (list, tuple, collections.abc.Sequence):
        args = [a for a in typing.get_args(ann) if a is not Ellipsis]
        if not isinstance(value, list):
            return False
        if origin is tuple and args and Ellipsis not in typing.get_args(ann):
            return len(value) == len(args) and all(check_type(v, a) for v, a in zip(value, args))
        return all(check_type(v, args[0]) for v in value) if args else True
    if ann is dict or origin in (dict, collections.abc.Mapping):
        return isinstance(value, dict)
    return True


def type_name(ann: Any) -> str:
    if typing.get_origin(ann) in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(ann))
    if ann is type(None):
        return "null"
    if typing.get_origin(ann) is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(ann))
    if isinstance(ann, type) and typing.get_origin(ann) is None:
        return ann.__name__
    return str(ann).replace("typing.", "")

