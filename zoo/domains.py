"""Value domains: what a recipe value may be, declared once beside the code that takes it.

A constructor parameter or a section key carries its domain in its annotation, and a class
may declare rules between its arguments::

    class DiT(nn.Module):
        constraints = (Divisible("hidden_size", "num_heads"), Divisible("input_size", "patch_size"))

        def __init__(self, hidden_size: Width = 1152, depth: Depth = 28, mlp_ratio: Ratio = 4.0, ...): ...

    TRAIN = {"lr": Annotated[float, Positive], "ema_decay": Annotated[float, Decay], ...}

``zoo.validate`` checks both before anything is built (``FILE:LINE: key a.b: ... must be ...,
got ...``, exit 2) and ``zoo list --verbose`` prints them. A float is always finite: YAML's
``.nan`` and ``.inf`` are refused wherever a number is taken. Upper bounds are where a value
would hang or allocate the machine away before any memory check could run.
Importing this module does not import torch.
"""

from __future__ import annotations

import collections.abc
import math
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Callable

# Upper bounds, all in one place: far above any published model, far below what hangs a machine.
MAX_WIDTH = 65536  # channels, hidden sizes
MAX_DEPTH = 1024  # blocks
MAX_HEADS = 1024
MAX_SIZE = 16384  # image / latent side
MAX_PATCH = 256
MAX_CLASSES = 1_000_000
MAX_RATIO = 64.0  # MLP expansion
MAX_STEPS = 10**9  # training steps, schedule steps, solver steps
MAX_BATCH = 65536
MAX_COUNT = 10**8  # dataset sizes, numbers of samples
MAX_SOLVER_STEPS = 100_000  # sampling steps, schedule length
MAX_WORKERS = 256  # data-reading processes


@dataclass(frozen=True)
class Range:
    """Numbers between ``lo`` and ``hi`` (either may be ``None``: unbounded; ``*_open``: excluded)."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def contains(self, value: Any) -> bool:
        if not is_number(value):
            return True  # the type check speaks about non-numbers
        if self.lo is not None and (value < self.lo or (self.lo_open and value == self.lo)):
            return False
        return not (self.hi is not None and (value > self.hi or (self.hi_open and value == self.hi)))

    def __and__(self, other: "Range") -> "Range":
        lo, lo_open = max(((self.lo, self.lo_open), (other.lo, other.lo_open)),
                          key=lambda b: (-math.inf if b[0] is None else b[0], b[1]))
        hi, hi_open = min(((self.hi, self.hi_open), (other.hi, other.hi_open)),
                          key=lambda b: (math.inf if b[0] is None else b[0], not b[1]))
        return Range(lo, hi, lo_open, hi_open)

    def describe(self, integer: bool = False) -> str:
        lo, hi, lo_open, hi_open = self.lo, self.hi, self.lo_open, self.hi_open
        if integer and lo is not None and lo_open and float(lo).is_integer():
            lo, lo_open = int(lo) + 1, False
        if integer and hi is not None and hi_open and float(hi).is_integer():
            hi, hi_open = int(hi) - 1, False
        if lo is not None and hi is not None:
            return f"in {'(' if lo_open else '['}{_num(lo)}, {_num(hi)}{')' if hi_open else ']'}"
        if lo is not None:
            return f"{'>' if lo_open else '>='} {_num(lo)}"
        if hi is not None:
            return f"{'<' if hi_open else '<='} {_num(hi)}"
        return ""


Positive = Range(0, lo_open=True)
NonNegative = Range(0)
Probability = Range(0, 1)
Decay = Range(0, 1, hi_open=True)  # EMA decays, Adam betas


def AtMost(hi: float) -> Range:  # noqa: N802 (reads as a domain, like Positive)
    return Range(hi=hi)


def AtLeast(lo: float) -> Range:  # noqa: N802
    return Range(lo=lo)


@dataclass(frozen=True, eq=False)
class OneOf:
    """A name from ``choices``, a collection read at check time (a registry dict stays current)."""

    choices: collections.abc.Collection
    what: str = "value"

    def contains(self, value: Any) -> bool:
        return isinstance(value, collections.abc.Hashable) and value in self.choices

    def describe(self) -> str:
        return "one of " + ", ".join(map(str, self.choices))


@dataclass(frozen=True)
class Length:
    """A list of ``lo`` to ``hi`` items."""

    lo: int = 1
    hi: int | None = None

    def contains(self, value: Any) -> bool:
        return not isinstance(value, list) or (len(value) >= self.lo and (self.hi is None or len(value) <= self.hi))

    def describe(self) -> str:
        if self.hi is None:
            return "non-empty" if self.lo == 1 else f"at least {self.lo} items"
        return f"{self.lo} to {self.hi} items"


NonEmpty = Length(1)


@dataclass(frozen=True)
class Doc:
    """A note on the meaning of a value (shown in listings and messages), e.g. ``Doc("0 = never")``."""

    text: str


@dataclass(frozen=True)
class Calls:
    """A factory parameter's call: the parent passes ``positional`` leading arguments and ``keywords``.

    A component given for it may leave exactly these out of the recipe, and must accept them:
    ``block: Annotated[Callable[..., nn.Module], Calls(1, ("num_heads", "cond_dim"))]`` refuses
    a ConvNeXt block (no ``num_heads``) at check time, not with a TypeError while building.
    """

    positional: int = 1
    keywords: tuple[str, ...] = ()

    def call_text(self) -> str:
        """The call's arguments as a listing shows them: ``dim, cond_dim=...``."""
        leading = ["dim"] * min(self.positional, 1) + ["..."] * (self.positional > 1)
        return ", ".join(leading + [f"{k}=..." for k in self.keywords])


#: A conditioner factory as every block calls it: ``norm(dim, cond_dim=...)``.
ConditionerFactory = Annotated[Callable[..., Any], Calls(1, ("cond_dim",))]
#: An MLP factory as the blocks call it: ``mlp(dim, hidden_features=...)``.
MlpFactory = Annotated[Callable[..., Any], Calls(1, ("hidden_features",))]


class _Required:
    def __repr__(self) -> str:
        return "Required"


#: A section-table key that must be present.
Required = _Required()

# --- the common parameter kinds -------------------------------------------------------------------

Width = Annotated[int, Range(1, MAX_WIDTH)]
Depth = Annotated[int, Range(1, MAX_DEPTH)]
Heads = Annotated[int, Range(1, MAX_HEADS)]
PatchSize = Annotated[int, Range(1, MAX_PATCH)]
ImageSize = Annotated[int, Range(1, MAX_SIZE)]
Channels = Annotated[int, Range(1, MAX_WIDTH)]
Classes = Annotated[int, Range(1, MAX_CLASSES)]
Ratio = Annotated[float, Range(0, MAX_RATIO, lo_open=True)]
Steps = Annotated[int, Range(1, MAX_STEPS)]
SolverSteps = Annotated[int, Range(1, MAX_SOLVER_STEPS)]
Time = Annotated[float, Range(0, 1, lo_open=True)]  # a diffusion time in (0, 1]
Eps = Annotated[float, Range(0, 1, lo_open=True)]
PositiveFloat = Annotated[float, Positive]
FrequencyWidth = Annotated[int, Range(2, MAX_WIDTH)]  # a sinusoid needs a sin/cos pair: 1 was all zero padding
TimeScale = PositiveFloat  # tau = t * time_scale: 0 made a time-dependent norm constant in time

# --- rules between arguments ------------------------------------------------------------------------


@dataclass(frozen=True)
class Divisible:
    """``field`` must be a multiple of ``by`` (e.g. a width of its number of heads)."""

    field: str
    by: str

    @property
    def fields(self) -> tuple[str, ...]:
        return (self.field, self.by)

    def check(self, args: typing.Mapping[str, Any]) -> str | None:
        a, b = args.get(self.field), args.get(self.by)
        if is_int(a) and is_int(b) and b > 0 and a % b:
            return f"{self.field}={a} must be divisible by {self.by}={b}"
        return None

    def describe(self) -> str:
        return f"{self.field} divisible by {self.by}"


@dataclass(frozen=True)
class Rule:
    """``test(**{f: args[f] for f in fields})`` must hold; ``text`` says what it requires.

    ``test`` returns ``None`` or ``True`` when satisfied, else ``False`` or a message of its own.
    The rule is skipped while one of its fields is not known yet (set later by a parent).
    """

    text: str
    test: Callable[..., Any]
    fields: tuple[str, ...]

    def check(self, args: typing.Mapping[str, Any]) -> str | None:
        if any(f not in args for f in self.fields):
            return None
        result = self.test(**{f: args[f] for f in self.fields})
        if result is None or result is True:
            return None
        here = ", ".join(f"{f}={args[f]!r}" for f in self.fields)
        return result if isinstance(result, str) else f"needs {self.text}; here {here}"

    def describe(self) -> str:
        return self.text


Constraint = typing.Union[Divisible, Rule]


def constraints_of(cls: Any) -> tuple[Constraint, ...]:
    """The cross-argument rules a class declares in its ``constraints`` attribute."""
    return tuple(getattr(cls, "constraints", ()) or ())


# --- reading annotations ------------------------------------------------------------------------------


def split(ann: Any) -> tuple[Any, tuple]:
    """``Annotated[T, *meta]`` → ``(T, meta)``; anything else → ``(ann, ())``."""
    if typing.get_origin(ann) is Annotated:
        return ann.__origin__, ann.__metadata__
    return ann, ()


def strip(ann: Any) -> Any:
    """The type without its domains."""
    return split(ann)[0]


def options(ann: Any) -> tuple:
    """The members of a Union / Optional (domains kept on each), or ``(ann,)``."""
    base, meta = split(ann)
    if typing.get_origin(base) in (typing.Union, types.UnionType):
        return tuple(Annotated[(a, *meta)] if meta else a for a in typing.get_args(base))
    return (ann,)


def range_of(meta: tuple) -> Range | None:
    ranges = [m for m in meta if isinstance(m, Range)]
    if not ranges:
        return None
    out = ranges[0]
    for r in ranges[1:]:
        out = out & r
    return out


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def non_finite(value: Any) -> bool:
    return isinstance(value, float) and not math.isfinite(value)


def fits(value: Any, ann: Any, domains: bool = True) -> bool:
    """Whether ``value`` (as YAML gives it) has the type of ``ann`` and, if ``domains``, lies in its domains.

    Annotations not worth checking (classes, callables, ``Any``) pass; with ``domains`` a float must be finite.
    """
    base, meta = split(ann)
    if domains and meta:
        for m in meta:
            if isinstance(m, (Range, OneOf, Length)) and not m.contains(value):
                return False
    origin = typing.get_origin(base)
    if origin in (typing.Union, types.UnionType):
        return any(fits(value, a, domains) for a in options(ann))
    if base is type(None) or base is None:
        return value is None
    if base is bool:
        return isinstance(value, bool)
    if base is int:
        return is_int(value)
    if base is float:
        return is_number(value) and not (domains and non_finite(value))
    if base is str:
        return isinstance(value, str)
    if origin is typing.Literal:
        return value in typing.get_args(base)
    if base in (list, tuple) or origin in (list, tuple, collections.abc.Sequence):
        args = [a for a in typing.get_args(base) if a is not Ellipsis]
        if not isinstance(value, list):
            return False
        if origin is tuple and args and Ellipsis not in typing.get_args(base):
            return len(value) == len(args) and all(fits(v, a, domains) for v, a in zip(value, args))
        return all(fits(v, args[0], domains) for v in value) if args else True
    if base is dict or origin in (dict, collections.abc.Mapping):
        return isinstance(value, dict)
    return True


def describe(ann: Any) -> str:
    """What ``ann`` allows, in words: ``an integer in [1, 1024]``, ``a number in [0, 1)``, ``true or false``."""
    base, meta = split(ann)
    notes = "".join(f" ({m.text})" for m in meta if isinstance(m, Doc))
    choice = next((m for m in meta if isinstance(m, OneOf)), None)
    if choice is not None:
        return choice.describe() + notes
    origin = typing.get_origin(base)
    if origin in (typing.Union, types.UnionType):
        parts = [describe(a) for a in options(ann)]
        return " or ".join(p for p in parts if p != "null") + (" or null" if "null" in parts else "") + notes
    span = range_of(meta)
    limit = f" {span.describe(base is int)}" if span is not None and span.describe() else ""
    positive = span is not None and span.lo == (0 if span.lo_open else 1) and (span.lo_open or base is int)
    if positive and base in (int, float):  # "a positive integer <= 1024" reads better than "in [1, 1024]"
        upper = Range(hi=span.hi, hi_open=span.hi_open).describe(base is int)
        noun = "integer" if base is int else "number"
        return f"a positive {noun}{' ' + upper if upper else ''}{notes}"
    length = next((m for m in meta if isinstance(m, Length)), None)
    if length is not None:
        text = _describe_type(base)
        text = (f"a non-empty {text[2:]}" if length.describe() == "non-empty" and text.startswith("a ")
                else f"{text} ({length.describe()})")
        return text + notes
    if base is int:
        return f"an integer{limit}{notes}"
    if base is float:
        return f"a number{limit}{notes}"
    if base is str and notes:  # Annotated[str, Doc("a path")] reads "a path"
        return notes.strip()[1:-1]
    return _describe_type(base) + notes


def _describe_type(base: Any) -> str:
    origin = typing.get_origin(base)
    if base is type(None) or base is None:
        return "null"
    if base is bool:
        return "true or false"
    if base is str:
        return "a string"
    if origin is typing.Literal:
        return "one of " + ", ".join(map(str, typing.get_args(base)))
    if base in (list, tuple) or origin in (list, tuple, collections.abc.Sequence):
        args = [a for a in typing.get_args(base) if a is not Ellipsis]
        if origin is tuple and args and Ellipsis not in typing.get_args(base):
            if all(a == args[0] for a in args):
                return f"a list of {len(args)} {_plural(describe(args[0]))}"
            return "a list [" + ", ".join(describe(a) for a in args) + "]"
        return f"a list of {_plural(describe(args[0]))}" if args else "a list"
    if base is dict or origin in (dict, collections.abc.Mapping):
        return "a mapping"
    if isinstance(base, type) and origin is None:
        return base.__name__
    return str(base).replace("typing.", "")


def _plural(text: str) -> str:
    for one, many in (("an integer", "integers"), ("a number", "numbers"), ("a string", "strings")):
        if text.startswith(one):
            return many + text[len(one):]
    return text


def _num(v: float) -> str:
    if float(v).is_integer():
        v = int(v)
        if abs(v) >= 10**6 and str(abs(v)).rstrip("0") == "1":
            return f"{'-' if v < 0 else ''}1e{len(str(abs(v))) - 1}"
        return str(v)
    return repr(float(v))


def domain_text(ann: Any) -> str:
    """Only the domain part of ``ann`` for listings (``in [1, 1024]``, ``one of a, b``), or ``""``."""
    base, meta = split(ann)
    choice = next((m for m in meta if isinstance(m, OneOf)), None)
    span = range_of(meta)
    parts = [choice.describe()] if choice else []
    parts += [m.describe() for m in meta if isinstance(m, Length)]
    if span is not None and span.describe():
        parts.append(span.describe(strip(base) is int))
    parts += [m.text for m in meta if isinstance(m, Doc)]
    parts += [f"called with ({m.call_text()})" for m in meta if isinstance(m, Calls)]
    if not parts and typing.get_origin(base) in (typing.Union, types.UnionType, list, tuple):
        inner = [domain_text(a) for a in typing.get_args(base) if a is not Ellipsis]
        parts = sorted({p for p in inner if p})
    return "; ".join(parts)
