"""Fast work on ``meta`` tensors: building full-size models and running them without weights.

``zoo build --flops`` must answer in seconds for billion-parameter recipes. On
the meta device two costs dominate, and both are PyTorch overhead rather than our work:

* the first ``nn.init`` / elementwise op / dispatch mode imports all of Dynamo and sympy
  (1–3 s) only to mark a function "not to be compiled" (:func:`no_dynamo_import`), and the
  FLOP counter imports Triton for kernels zoo's models do not hold (:func:`no_triton_import`);
* many meta kernels are Python (prims/refs, ~1 ms each) and a deep backbone repeats the same
  op on the same shapes in every block (:class:`MetaShapeCache` caches op results,
  :class:`RepeatedBlockMemo` skips repeated blocks while counting FLOPs or checking shapes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import sys
import threading
import traceback
import types
from typing import Any, Callable, Iterator, TypeVar

import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from zoo.errors import UserError

T = TypeVar("T")


class NeedsDynamo(AttributeError):
    """Code under :func:`no_dynamo_import` asked for a real part of Dynamo."""


@contextlib.contextmanager
def no_dynamo_import() -> Iterator[None]:
    """Keep ``torch._dynamo`` from being imported inside this context.

    PyTorch wraps its Python meta kernels, ``nn.init`` refs and every dispatch mode in
    ``torch._disable_dynamo``, which imports Dynamo on first call just to call
    ``torch._dynamo.disable(fn)``. Inside this context ``import torch._dynamo`` finds a stand-in
    whose ``disable(fn)`` returns ``fn`` unchanged; anything else raises :class:`NeedsDynamo`.
    On exit the stand-in and the marks it left on functions are removed, so a later real
    import (and ``torch.compile``) is unaffected. A no-op when Dynamo is already imported, and
    in a process with more than one thread: ``sys.modules`` is shared, and another thread's
    ``torch.compile`` must find the real Dynamo (it then costs this thread the import).
    """
    if "torch._dynamo" in sys.modules or threading.active_count() > 1:
        yield
        return
    marked: list[Any] = []

    class _StandIn(types.ModuleType):
        def disable(self, fn: Any, recursive: bool = True, wrapping: bool = True) -> Any:
            marked.append(fn)
            return fn

        def __getattr__(self, name: str) -> Any:
            raise NeedsDynamo(f"torch._dynamo.{name}")

    stand_in = _StandIn("torch._dynamo")
    sys.modules["torch._dynamo"] = stand_in
    try:
        yield
    finally:
        if sys.modules.get("torch._dynamo") is stand_in:
            del sys.modules["torch._dynamo"]
        if torch.__dict__.get("_dynamo") is stand_in:
            del torch._dynamo
        for fn in marked:  # torch._disable_dynamo caches its result as fn.__dynamo_disable
            getattr(fn, "__dict__", {}).pop("__dynamo_disable", None)


@contextlib.contextmanager
def no_triton_import() -> Iterator[None]:
    """Make ``import triton`` fail inside this context, as where Triton is not installed.

    ``torch.utils.flop_counter`` imports Triton (0.2 s CPU, more from a cold disk) only so that
    ``register_flop_formula`` accepts Triton kernels, which zoo's models do not hold. Inside this
    context ``sys.modules["triton"]`` is ``None`` (an import raises ``ImportError``); on exit the
    entry is removed again. A no-op when ``triton`` is already in ``sys.modules``, and in a process with
    more than one thread (another thread may be importing Triton for its own kernels).
    """
    if "triton" in sys.modules or threading.active_count() > 1:
        yield
        return
    sys.modules["triton"] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        if "triton" in sys.modules and sys.modules["triton"] is None:
            del sys.modules["triton"]


def without_dynamo(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` under :func:`no_dynamo_import`, run again normally if it needs Dynamo.

    Only for work that may run twice (building a model, counting FLOPs).
    """
    try:
        with no_dynamo_import():
            return fn(*args, **kwargs)
    except (NeedsDynamo, ImportError):
        return fn(*args, **kwargs)


def build_on_meta(factory: Callable[[], nn.Module]) -> nn.Module:
    """``factory()`` under ``torch.device("meta")`` (no weights allocated) and :func:`without_dynamo`."""

    def build() -> nn.Module:
        with torch.device("meta"):
            return factory()

    return without_dynamo(build)


def model_device(model: nn.Module) -> torch.device | None:
    """The device of the model's first parameter (or buffer); None for a model that holds neither."""
    return next((t.device for t in itertools.chain(model.parameters(), model.buffers())), None)


def example_inputs(model: nn.Module, batch: int = 1) -> tuple:
    """``model.example_inputs(batch)``: the forward's arguments zoo runs a model on without data (the
    FLOP count, the memory estimate, the shapes of training data and samples). A model class without
    the method (a ``_target_`` backbone, say) is one message saying what to add.

    Made under the model's device (the "current device" plugins are told to use, meta included) and moved
    there where the method names another (``torch.randn(..., device="cpu")``): a forward on a meta model
    with cpu inputs fails. The global random state is left as it was."""
    if not callable(getattr(model, "example_inputs", None)):
        raise UserError(f"{type(model).__name__} has no example_inputs(batch) method, so zoo cannot make its inputs",
                        suggestion="give the class example_inputs(batch) returning its forward's arguments (x, t, y) "
                        "for a batch of that size")
    device = model_device(model)
    with _rng_untouched(device):  # the inputs' noise is not the caller's: seed, build an eps_fn, draw x_T as usual
        if device is None:
            return tuple(model.example_inputs(batch))
        with torch.device(device):
            args = tuple(model.example_inputs(batch))
    return tuple(a.to(device) if isinstance(a, torch.Tensor) and a.device != device else a for a in args)


def _rng_untouched(device: torch.device | None) -> contextlib.AbstractContextManager:
    """The global random state as it was, after drawing on ``device`` (and the CPU) inside."""
    if device is not None and device.type == "meta":
        return contextlib.nullcontext()  # meta draws no numbers
    if device is not None and device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.random.fork_rng(devices=[index], device_type="cuda")
    if device is not None and device.type == "mps":
        return torch.random.fork_rng(devices=[0], device_type="mps")
    return torch.random.fork_rng(devices=[])


class NotOnMeta(Exception):
    """A model's forward failed on the meta device (data-dependent code: ``.item()``, ``bool(x)``, numpy)."""

    def __init__(self, model: nn.Module, err: BaseException) -> None:
        first = (str(err).strip().splitlines() or [""])[0]
        torch_dir = os.path.dirname(torch.__file__)
        frames = [f for f in traceback.extract_tb(err.__traceback__)  # the model's own line: not torch's, not ours here
                  if not f.filename.startswith(torch_dir) and f.filename != __file__]
        where = f" at {os.path.basename(frames[-1].filename)}:{frames[-1].lineno}" if frames else ""
        super().__init__(f"{type(model).__name__} cannot run on the meta device ({type(err).__name__}{where}: "
                         f"{first})")


def meta_forward(model: nn.Module, *inputs: Any) -> Any:
    """``model(*inputs)`` on meta tensors; a failure of the model's own code is :class:`NotOnMeta`
    (callers skip what they measure, or say how to measure on a real device), a :class:`UserError` stays one."""
    try:
        return model(*inputs)
    except (UserError, NeedsDynamo, ImportError):  # ours, or without_dynamo's cue to run it again
        raise
    except Exception as err:  # noqa: BLE001 - any failure of user code on meta tensors
        raise NotOnMeta(model, err) from err


class MetaShapeCache(TorchDispatchMode):
    """Reuse meta-kernel results for repeated calls with the same input metadata.

    An op called again with inputs of the same shapes, strides and dtypes (and the same
    non-tensor arguments) gets a fresh empty meta tensor of the cached shape, stride and dtype
    instead of running its (often Python) meta kernel. Ops that mutate or return views always
    run. Only calls whose tensors are all on the meta device are cached.
    """

    def __init__(self) -> None:
        super().__init__()
        self.cache: dict[Any, Any] = {}

    @staticmethod
    def _key(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return ("T", tuple(value.shape), value.stride(), value.dtype, value.device.type)
        if isinstance(value, (list, tuple)):
            return (type(value).__name__, *map(MetaShapeCache._key, value))
        return (type(value).__name__, repr(value))

    @staticmethod
    def _is_spec(value: Any) -> bool:
        return isinstance(value, tuple) and len(value) == 3 and isinstance(value[2], torch.dtype)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        schema = func._schema
        if schema.is_mutable or any(r.alias_info is not None for r in schema.returns):
            return func(*args, **kwargs)
        leaves = pytree.arg_tree_leaves(*args, **kwargs)
        if not all(t.is_meta for t in leaves if isinstance(t, torch.Tensor)):
            return func(*args, **kwargs)
        key = (func, self._key(args), self._key(sorted(kwargs.items())))
        spec = self.cache.get(key)
        if spec is None:
            out = func(*args, **kwargs)
            self.cache[key] = pytree.tree_map_only(torch.Tensor, lambda t: (tuple(t.shape), t.stride(), t.dtype), out)
            return out
        return pytree.tree_map_only(
            tuple, lambda s: torch.empty_strided(s[0], s[1], dtype=s[2], device="meta"), spec, is_leaf=self._is_spec
        )


_PLAIN = (int, float, bool, str, type(None))
#: What every nn.Module holds (parameters, buffers, submodules, hooks): covered by the paths and tensors.
_MODULE_INTERNALS = frozenset(vars(nn.Module()))


def _setting_key(value: Any) -> Any:
    """A hashable stand-in for one attribute of a module: equal only where the settings are equal.

    Plain values stand for themselves; containers, dataclasses and tensors are taken apart; anything
    else (an enum, a NumPy integer, a plugin's config object) by its ``repr``, so two blocks that
    differ only in such a setting are never taken for repeats.
    """
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, *map(_setting_key, value))
    if isinstance(value, dict):
        return ("dict", *sorted(((repr(k), _setting_key(v)) for k, v in value.items()), key=lambda kv: kv[0]))
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return (type(value), *(_setting_key(getattr(value, f.name)) for f in dataclasses.fields(value)))
    return (type(value), repr(value))


def _structure(module: nn.Module) -> tuple:
    """What decides a module's output shapes and FLOPs: its classes, tensor shapes and settings."""
    parts = []
    for path, sub in module.named_modules():
        # private settings count too (a block slicing by its ``self._index``, repeating by its ``self._plan``
        # tuple); nn.Module's own dicts of parameters, buffers, submodules and hooks are covered by the
        # paths and tensors
        settings = tuple((k, _setting_key(v)) for k, v in sorted(vars(sub).items()) if k not in _MODULE_INTERNALS)
        parts.append((path, type(sub), settings))
    tensors = tuple((n, tuple(t.shape), t.dtype) for n, t in [*module.named_parameters(), *module.named_buffers()])
    return (*parts, tensors)


def _input_key(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return (type(value), *(_input_key(getattr(value, f.name)) for f in dataclasses.fields(value)))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, *map(_input_key, value))
    if isinstance(value, dict):
        return ("dict", *((k, _input_key(v)) for k, v in sorted(value.items())))
    return MetaShapeCache._key(value)


class RepeatedBlockMemo:
    """Run each distinct block of a ``ModuleList`` / ``Sequential`` once in a forward on meta.

    A block with the same structure (:func:`_structure`) called on inputs with the same
    metadata as an earlier one returns tensors of the same shapes (and does the same FLOPs):
    instead of running it again, fresh empty meta tensors of the shapes it gave before are
    returned. With a ``FlopCounterMode`` as ``counter`` its recorded per-op counts are also added
    under its own path, its sub-modules' paths and its callers'; without one (``counter=None``)
    only the shapes are reused, for checks that need the output's shape alone. Only for meta
    inputs; a block whose outputs are not tensors runs normally.
    """

    def __init__(self, model: nn.Module, counter: Any = None):
        self.model, self.counter = model, counter
        self.records: dict[Any, Any] = {}
        self.patched: list[tuple[nn.Module, Any]] = []

    def __enter__(self) -> "RepeatedBlockMemo":
        if self.counter is not None and not (hasattr(self.counter, "flop_counts")
                                             and hasattr(self.counter, "mod_tracker")):
            return self  # a PyTorch whose FlopCounterMode differs: count everything
        root = type(self.model).__name__
        for path, parent in self.model.named_modules():
            if isinstance(parent, (nn.ModuleList, nn.Sequential)):
                for name, block in parent.named_children():
                    full = f"{root}.{path}.{name}" if path else f"{root}.{name}"
                    self.patched.append((block, block.__dict__.get("forward")))
                    block.forward = self._wrap(block, full, _structure(block))
        return self

    def __exit__(self, *exc: Any) -> None:
        for block, own_forward in self.patched:
            block.__dict__.pop("forward", None)
            if own_forward is not None:
                block.forward = own_forward

    def _wrap(self, block: nn.Module, name: str, structure: tuple) -> Callable[..., Any]:
        forward = block.__dict__.get("forward") or type(block).forward.__get__(block)
        counts = self.counter.flop_counts if self.counter is not None else {}

        def memo_forward(*args: Any, **kwargs: Any) -> Any:
            leaves = pytree.arg_tree_leaves(*args, **kwargs)
            if not all(t.is_meta for t in leaves if isinstance(t, torch.Tensor)):
                return forward(*args, **kwargs)
            key = (structure, _input_key(args), _input_key(kwargs))
            record = self.records.get(key)
            if record is None:
                mine = [k for k in counts if k == name or k.startswith(name + ".")]
                before = {k: dict(counts[k]) for k in mine}
                out = forward(*args, **kwargs)
                if all(isinstance(t, torch.Tensor) for t in pytree.tree_leaves(out)):
                    delta = {}
                    for k in [k for k in counts if k == name or k.startswith(name + ".")]:
                        ops = {op: v - before.get(k, {}).get(op, 0) for op, v in counts[k].items()}
                        delta[k[len(name):]] = {op: v for op, v in ops.items() if v}
                    spec = pytree.tree_map_only(torch.Tensor, lambda t: (tuple(t.shape), t.stride(), t.dtype), out)
                    self.records[key] = (delta, spec)
                return out
            delta, spec = record
            for suffix, ops in delta.items():
                for op, v in ops.items():
                    counts[name + suffix][op] += v
            if self.counter is not None:
                for caller in self.counter.mod_tracker.parents:
                    if caller != name:
                        for op, v in delta.get("", {}).items():
                            counts[caller][op] += v
            return pytree.tree_map_only(
                tuple, lambda s: torch.empty_strided(s[0], s[1], dtype=s[2], device="meta"), spec,
                is_leaf=MetaShapeCache._is_spec,
            )

        return memo_forward
