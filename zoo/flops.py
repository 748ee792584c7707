"""FLOP counting: parameters and GFLOPs of a backbone, with a per-module breakdown.

Convention (the field's): one multiply-add is one FLOP, so "GFLOPs" are GMACs;
matmuls, linears and convolutions (grouped/depthwise included) are counted, and so are the
two attention matmuls; elementwise ops (norms, activations, additions) are not.

Two counters:

* ``"torch"`` (default): ``torch.utils.flop_counter.FlopCounterMode``. It reports 2 FLOPs per
  MAC (we halve it). On the ``meta`` device it needs no weights and takes well under a second
  for XL models; SDPA decomposes to ``bmm`` there. On CPU tensors SDPA dispatches to
  ``aten._scaled_dot_product_flash_attention_for_cpu``, which has no formula upstream: we map
  it to ``B·H·Lq·Lk·(E+Ev)`` MACs.
* ``"fvcore"``: fvcore's ``FlopCountAnalysis`` (jit trace; real tensors; slow for XL). It
  drops ``aten::scaled_dot_product_attention`` as unsupported (DiT-S/2 reads 5.46 instead of
  6.06 GFLOPs); we give it a handle with the same formula, and switch off its norm handles
  (fvcore counts LayerNorm/GroupNorm as elementwise FLOPs, which the convention leaves out).

The precise official U-ViT and DiMR numbers (35.27, 133.28, 160.23, ...) are stock fvcore plus
attention, i.e. they also hold fvcore's LayerNorm count (5 FLOPs per element) and the like; the
default convention leaves those out and reads 0.02–0.1% lower (U-ViT-M/4: 35.236).
``convention="official"`` (``zoo build --flops --convention official``) adds, on the torch counter,
formulas for the aten ops fvcore's default handles count, as each family's authors counted: U-ViT,
DiMR (and models zoo does not know) get fvcore's handles, DiT none (its published figures are
multiply-adds: stock fvcore reads DiT-S/2 as 6.07, the paper 6.06). Where zoo's modules call other
ops than the official ones for the same math, the official op is counted: DiMR's TD-LN as the affine
LayerNorm, its ``avg_pool2d`` downsampling as area interpolation (``adaptive_avg_pool2d``); its
TD-RMSNorm is elementwise ops in both, uncounted. Official figures, all matched to 2 decimals:
U-ViT-M/4 35.27, L/4 76.53, H/2 133.28, H/4 133.31, DiMR M/3R 53.58, L/3R 110.68, XL/2R 160.23,
XL/3R 206.19, G/2R 331.19 (fvcore on the official code: U-ViT-M/4 35.270484, DiMR-XL/2R 160.231663).

On the meta device the count runs under :mod:`zoo.meta`'s helpers (no Dynamo import, cached
meta kernels, each repeated block run once), and the counter's module is imported without Triton,
so ``zoo build --flops`` stays within seconds for the largest recipes.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from zoo.errors import UserError
from zoo.meta import (MetaShapeCache, NeedsDynamo, NotOnMeta, RepeatedBlockMemo, build_on_meta, example_inputs,
                      meta_forward, model_device, no_triton_import, without_dynamo)
from zoo.modes import evaluating

COUNTERS = ("torch", "fvcore")
_COUNT_ON_CPU = "count on real tensors: zoo build --flops --device cpu (or build the model on cpu before count_flops)"
CONVENTIONS = ("macs", "official")
# fvcore handles for elementwise ops we do not count (the convention counts matmuls/convs only).
_FVCORE_ELEMENTWISE = (
    "aten::batch_norm", "aten::group_norm", "aten::layer_norm", "aten::instance_norm",
    "aten::upsample_nearest2d", "aten::upsample_bilinear2d", "aten::adaptive_avg_pool2d",
    "aten::grid_sampler",
)


def attention_macs(q_shape: Sequence[int], k_shape: Sequence[int], v_shape: Sequence[int]) -> int:
    """MACs of ``softmax(q kᵀ) v``: ``B·H·Lq·Lk·(E+Ev)`` (q is ``(..., Lq, E)``, v ``(..., Lk, Ev)``)."""
    *batch, lq, e = q_shape
    lk, ev = v_shape[-2], v_shape[-1]
    return math.prod(batch) * lq * lk * (e + ev)


def _cpu_flash_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FlopCounterMode formula for ``_scaled_dot_product_flash_attention_for_cpu`` (2 FLOPs per MAC)."""
    return 2 * attention_macs(query_shape, key_shape, value_shape)


def _torch_custom_mapping(convention: str = "macs") -> dict[Any, Any]:
    mapping = {}
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None:
        mapping[op] = _cpu_flash_sdpa_flops
    if convention == "fvcore":
        mapping.update(_fvcore_elementwise_mapping())
    return mapping


# --- the "official" convention: fvcore's default elementwise handles, as formulas on aten ops ----------
#
# FlopCounterMode reports 2 FLOPs per MAC and we halve its total, so each formula below returns twice
# what fvcore's handle counts. fvcore (0.1.5, flop_count._DEFAULT_SUPPORTED_OPS, jit_handles):
# layer_norm / group_norm 5 per input element with an affine weight, 4 without; batch_norm in eval
# 2 per element with affine, 1 without (as layer_norm when training); upsample_nearest2d 1 per output
# element, upsample_bilinear2d and grid_sampler 4; adaptive_avg_pool2d 1 per input element.

_AFFINE_LAYER_NORM = [0]  # > 0 while a module whose official counterpart is an affine LayerNorm runs


def _numel(shape: Sequence[int]) -> int:
    return math.prod(shape)


def _layer_norm_flops(x_shape, normalized_shape, weight_shape=None, *args, out_shape=None, **kwargs) -> int:
    affine = weight_shape is not None or _AFFINE_LAYER_NORM[0] > 0
    return 2 * _numel(x_shape) * (5 if affine else 4)


def _group_norm_flops(x_shape, weight_shape=None, *args, out_shape=None, **kwargs) -> int:
    return 2 * _numel(x_shape) * (5 if weight_shape is not None else 4)


def _batch_norm_eval_flops(x_shape, weight_shape=None, *args, out_shape=None, **kwargs) -> int:
    return 2 * _numel(x_shape) * (2 if weight_shape is not None else 1)


def _batch_norm_flops(x_shape, weight_shape=None, bias_shape=None, mean_shape=None, var_shape=None,
                      training=False, *args, out_shape=None, **kwargs) -> int:
    if training:
        return 2 * _numel(x_shape) * (5 if weight_shape is not None else 4)
    return _batch_norm_eval_flops(x_shape, weight_shape)


def _per_output(scale: int):
    def formula(*args, out_shape=None, **kwargs) -> int:
        return 2 * scale * _numel(out_shape)
    return formula


def _per_input(scale: int):
    def formula(x_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * scale * _numel(x_shape)
    return formula


def _fvcore_elementwise_mapping() -> dict[Any, Any]:
    aten = torch.ops.aten
    table = {
        "native_layer_norm": _layer_norm_flops,
        "native_group_norm": _group_norm_flops,
        "_native_batch_norm_legit_no_training": _batch_norm_eval_flops,
        "native_batch_norm": _batch_norm_flops,
        "upsample_nearest2d": _per_output(1),
        "_upsample_nearest_exact2d": _per_output(1),
        "upsample_bilinear2d": _per_output(4),
        "grid_sampler_2d": _per_output(4),
        "_adaptive_avg_pool2d": _per_input(1),
        # zoo's DiMR branch downsamples its input by an integer factor with avg_pool2d; the official
        # EvenDownInterpolate calls F.interpolate(mode="area"), i.e. adaptive_avg_pool2d: 1 per input element
        "avg_pool2d": _per_input(1),
    }
    mapping = {}
    for name, formula in table.items():
        packet = getattr(aten, name, None)
        if packet is None:
            continue
        # keyed by each overload too: FlopCounterMode decomposes an overload it has no key for (before
        # looking up its packet), and upsample_nearest2d.default decomposes into index ops, uncounted
        mapping[packet] = formula
        mapping.update({getattr(packet, overload): formula for overload in packet.overloads()})
    return mapping


@contextlib.contextmanager
def _official_affine_layer_norms(model: nn.Module):
    """While a TD-LN runs, its LayerNorm counts as affine (5 per element).

    zoo's :class:`~zoo.conditioning.time_dependent.TimeDependentLayerNorm` calls the affine
    ``F.layer_norm`` only when the whole batch shares one time (a 0-d ``t``) and otherwise a plain
    LayerNorm followed by a per-sample ``addcmul``. The official DiMR LayerNorm takes the affine call
    whenever every sample of the batch has the same time (always at batch 1), which fvcore counts at
    5 per element.
    """
    from zoo.conditioning.time_dependent import TimeDependentLayerNorm

    def enter(module, args):
        _AFFINE_LAYER_NORM[0] += 1

    def leave(module, args, output):
        _AFFINE_LAYER_NORM[0] -= 1

    handles = []
    for module in model.modules():
        if isinstance(module, TimeDependentLayerNorm):
            handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        _AFFINE_LAYER_NORM[0] = 0


def official_convention(model: nn.Module) -> str:
    """The counting rule of the figures a model's authors published: ``"macs"`` or ``"fvcore"``.

    DiT's published GFLOPs (6.06, 118.6, 524.6, ...) are multiply-adds alone: stock fvcore, which also
    counts its LayerNorms (4 FLOPs per element, no affine), reads 6.07 for DiT-S/2 and 118.69 for
    DiT-XL/2. U-ViT's and DiMR's (35.27, 133.28, 160.23, ...) are stock fvcore plus an attention
    handle, so they also hold fvcore's elementwise handles (LayerNorm 5 per element, DiMR's area
    downsampling 1 per input element). A model zoo does not know is counted as U-ViT's and DiMR's are.
    """
    from zoo.backbones.dit import DiT

    return "macs" if isinstance(model, DiT) else "fvcore"


@dataclass
class FlopReport:
    """What ``count_flops`` measured.

    Attributes:
        gflops: total GMACs of one forward pass on the given inputs.
        params: all parameters, ``sum(p.numel())`` (frozen ones included).
        trainable_params: parameters with ``requires_grad``.
        by_module: GMACs per module path (``"blocks.0.attn"``), for paths up to ``max_depth``
            dots deep; containers (``ModuleList``) get the sum of their children.
        params_by_module: parameter count for the same paths.
        counter: ``"torch"`` or ``"fvcore"``.
        max_depth: the depth of ``by_module`` and the default depth of :meth:`table`.
        convention: ``"macs"`` (multiply-adds only) or ``"official"`` (as the model's authors counted).
    """

    gflops: float
    params: int
    trainable_params: int
    by_module: dict[str, float] = field(default_factory=dict)
    params_by_module: dict[str, int] = field(default_factory=dict)
    counter: str = "torch"
    max_depth: int = 2
    convention: str = "macs"

    def to_dict(self, with_modules: bool = False) -> dict[str, Any]:
        """A JSON-ready dict: ``params``, ``trainable_params``, ``gflops`` (+ ``by_module``)."""
        out: dict[str, Any] = {
            "params": int(self.params),
            "trainable_params": int(self.trainable_params),
            "gflops": float(self.gflops),
        }
        if with_modules:
            out["by_module"] = {k: float(v) for k, v in self.by_module.items()}
        return out

    def table(self, max_depth: int | None = None) -> str:
        """A printable table: module path (indented by depth), params, GFLOPs, share of total.

        A row ``(other)`` under the total holds what is outside any top-level submodule, so that
        the top-level rows add up to the total: the work a backbone does in its own ``forward``
        (e.g. sub-pixel upsampling) and parameters it holds itself (e.g. DiT's ``pos_embed``).
        """
        depth = self.max_depth if max_depth is None else max_depth
        rows = [("total", self.params, self.gflops)]
        for path, g in self.by_module.items():
            if path.count(".") + 1 <= depth:
                rows.append(("  " * path.count(".") + "  " + path, self.params_by_module.get(path, 0), g))
        top = [p for p in self.by_module if "." not in p]
        other = self.gflops - sum(self.by_module[p] for p in top)
        other = other if abs(other) > 5e-7 * max(self.gflops, 1e-12) else 0.0  # not rounding's -0.000
        other_params = self.params - sum(self.params_by_module.get(p, 0) for p in top)
        if top and (other or other_params):
            rows.append(("  (other)", other_params, other))
        width = max(len(r[0]) for r in rows)
        lines = [f"{'module':<{width}}  {'params':>14}  {'GFLOPs':>10}  {'share':>6}"]
        for name, p, g in rows:
            share = g / self.gflops if self.gflops else 0.0
            lines.append(f"{name:<{width}}  {p:>14,}  {g:>10.3f}  {share:>6.1%}")
        return "\n".join(lines)


def _as_args(inputs: Any) -> tuple:
    if isinstance(inputs, torch.Tensor):
        return (inputs,)
    return tuple(inputs)


def _default_inputs(model: nn.Module) -> tuple:
    try:
        return example_inputs(model)
    except UserError as err:
        raise UserError(err.message, suggestion=f"{err.suggestion}, or call zoo.flops.count_flops(model, "
                        "inputs=...)") from None


def _inputs(model: nn.Module, inputs: Any) -> tuple:
    """The forward's arguments: ``inputs``, or ``example_inputs(1)`` made under the model's device (the
    "current device" of docs/integrations.md) and moved there where made elsewhere (an explicit cpu).
    Given inputs on meta and a model off it, or the other way round, are one message naming both."""
    device = model_device(model)
    if inputs is None:
        try:
            return _as_args(_default_inputs(model))  # made under the model's device, moved there
        except (UserError, NeedsDynamo, ImportError):
            raise
        except Exception as err:  # noqa: BLE001 - the model's own example_inputs, on meta
            if device is None or device.type != "meta":
                raise
            raise UserError(str(NotOnMeta(model, err)), suggestion=_COUNT_ON_CPU) from None
    args = _as_args(inputs)
    places = {a.device.type for a in args if isinstance(a, torch.Tensor)}
    if device is not None and places and "meta" in places | {device.type} and places != {device.type}:
        raise UserError(f"the inputs are on {' and '.join(sorted(places))} and the model on {device.type}: "
                        "one forward pass needs both on one device",
                        suggestion="make the inputs on the model's device, or build the model on meta "
                        "(zoo.meta.build_on_meta) to count without weights" if device.type != "meta" else
                        "move the inputs to meta (a.to('meta') for each), or build the model on cpu")
    return args


def _module_paths(model: nn.Module, max_depth: int) -> list[str]:
    return [n for n, _ in model.named_modules() if n and n.count(".") + 1 <= max_depth]


def _param_counts(model: nn.Module, paths: list[str]) -> dict[str, int]:
    mods = dict(model.named_modules())
    return {p: sum(q.numel() for q in mods[p].parameters()) for p in paths}


def _fill_containers(model: nn.Module, counted: dict[str, float], paths: list[str]) -> dict[str, float]:
    """GMACs for every path; a module that never ran (a ``ModuleList``) sums its children."""
    mods = dict(model.named_modules())

    def total(path: str) -> float:
        if path in counted:
            return counted[path]
        prefix = f"{path}." if path else ""
        return sum(total(prefix + name) for name, _ in mods[path].named_children())

    return {p: total(p) for p in paths}


def _flop_counter_mode() -> type:
    """``FlopCounterMode``, its module imported without Triton (:func:`~zoo.meta.no_triton_import`; 0.2-0.5 s
    of each ``zoo build --flops``) and without its "triton not found" warning. Where that import is the
    first, ``register_flop_formula`` then refuses Triton kernels in this process (zoo's models hold none)."""
    log = logging.getLogger("torch.utils.flop_counter")
    disabled, log.disabled = log.disabled, True
    try:
        with no_triton_import():
            from torch.utils.flop_counter import FlopCounterMode
    finally:
        log.disabled = disabled
    return FlopCounterMode


def _count_torch(model: nn.Module, inputs: Any, rule: str = "macs") -> tuple[float, dict[str, float]]:
    FlopCounterMode = _flop_counter_mode()
    args = _inputs(model, inputs)
    on_meta = any(isinstance(a, torch.Tensor) and a.is_meta for a in args)
    fvcore_rule = rule == "fvcore"
    with MetaShapeCache() if on_meta else contextlib.nullcontext(), \
            _official_affine_layer_norms(model) if fvcore_rule else contextlib.nullcontext():
        with FlopCounterMode(display=False, custom_mapping=_torch_custom_mapping(rule)) as counter:
            with RepeatedBlockMemo(model, counter) if on_meta else contextlib.nullcontext():
                if on_meta:
                    _meta_count_forward(model, args)
                else:
                    model(*args)
    counts = counter.get_flop_counts()
    total = sum(counts.get("Global", {}).values()) / 2 / 1e9
    counted = {}
    for name, ops in counts.items():
        if name == "Global" or "." not in name:
            continue  # the root module is keyed by its class name; its total is Global's
        counted[name.split(".", 1)[1]] = sum(ops.values()) / 2 / 1e9
    return total, counted


def _meta_count_forward(model: nn.Module, args: tuple) -> None:
    try:
        meta_forward(model, *args)
    except NotOnMeta as err:
        raise UserError(str(err), suggestion=_COUNT_ON_CPU) from None


def fvcore_attention_handle(inputs: list[Any], outputs: list[Any]) -> int:
    """fvcore op handle for ``aten::scaled_dot_product_attention``: ``B·H·Lq·Lk·(E+Ev)`` MACs."""
    from fvcore.nn.jit_handles import get_shape

    q, k, v = (get_shape(x) for x in inputs[:3])
    return attention_macs(q, k, v)


def _no_flops(inputs: list[Any], outputs: list[Any]) -> int:
    return 0


def _count_fvcore(model: nn.Module, args: tuple, sdpa_handle: bool = True) -> tuple[float, dict[str, float]]:
    from fvcore.nn import FlopCountAnalysis

    analysis = FlopCountAnalysis(model, args)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    handles = {name: _no_flops for name in _FVCORE_ELEMENTWISE}  # (a None handle does not override)
    if sdpa_handle:
        handles["aten::scaled_dot_product_attention"] = fvcore_attention_handle
    analysis.set_op_handle(**handles)
    by_module = {k: v / 1e9 for k, v in analysis.by_module().items() if k}
    return analysis.total() / 1e9, by_module


def count_flops(
    model: nn.Module,
    inputs: Any = None,
    *,
    max_depth: int = 2,
    counter: str = "torch",
    fvcore_sdpa_handle: bool = True,
    convention: str = "macs",
) -> FlopReport:
    """Parameters and GFLOPs (GMACs) of one forward pass ``model(*inputs)``.

    ``inputs`` defaults to ``model.example_inputs(1)`` (on the model's device: build the model
    under ``torch.device("meta")`` to count without allocating weights). The model runs in
    eval mode under ``no_grad`` and its training flags are restored. ``counter="fvcore"``
    needs real (non-meta) tensors; ``fvcore_sdpa_handle=False`` reproduces fvcore's own
    behaviour of dropping SDPA (for tests and to explain published 5.46-vs-6.06 gaps).

    ``convention="official"`` counts as the model's authors did for their published figures
    (:func:`official_convention`): DiT's are multiply-adds alone, U-ViT's and DiMR's add fvcore's
    elementwise handles (LayerNorm 5 FLOPs per element, ...); torch counter only.
    """
    if counter not in COUNTERS:
        raise UserError(f"unknown FLOP counter {counter!r}; choose one of {COUNTERS}")
    if convention not in CONVENTIONS:
        raise UserError(f"unknown FLOP convention {convention!r}; choose one of {CONVENTIONS}")
    if convention == "official" and counter != "torch":
        raise UserError("the official convention is counted by the torch counter", suggestion="counter='torch'")
    rule = official_convention(model) if convention == "official" else "macs"
    if counter == "fvcore":
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            raise UserError("the fvcore counter cannot trace a torch.compile'd model (jit.trace refuses Dynamo's "
                            "frames)", suggestion="counter='torch' counts it, or pass the model before torch.compile")
        args = _inputs(model, inputs)
        if any(isinstance(a, torch.Tensor) and a.is_meta for a in args):
            raise UserError("the fvcore counter needs real tensors; build the model on cpu (or use counter='torch')")

    with evaluating(model), torch.no_grad():
        if counter == "torch":  # (meta: example inputs are made inside, away from Dynamo's import)
            total, counted = without_dynamo(_count_torch, model, inputs, rule)
        else:
            total, counted = _count_fvcore(model, args, sdpa_handle=fvcore_sdpa_handle)

    paths = _module_paths(model, max_depth)
    return FlopReport(
        gflops=total,
        params=sum(p.numel() for p in model.parameters()),
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        by_module=_fill_containers(model, counted, paths),
        params_by_module=_param_counts(model, paths),
        counter=counter,
        max_depth=max_depth,
        convention=convention,
    )


def count_recipe_flops(recipe: Any, overrides: Sequence[str] = (), *, max_depth: int = 2,
                       convention: str = "macs") -> FlopReport:
    """Build a recipe's model on the ``meta`` device (no weights allocated) and count it."""
    import zoo

    model = build_on_meta(lambda: zoo.build_model(recipe, list(overrides)))
    return count_flops(model, max_depth=max_depth, convention=convention)
