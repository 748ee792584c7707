"""Float32 error budgets for tests that compare against numbers made on another machine.

The golden files were made on one x86 CPU; the suite must pass on any x86-64 or arm64 CPU.
Two things differ between CPUs in our float32 arithmetic:

* **Sinusoids of large arguments.** ``timestep_sinusoid`` computes ``f_k = exp(-ln(P) k/half)``
  and ``a = t * f_k`` in float32, then ``cos(a)``, ``sin(a)``. Vectorised ``exp`` (SLEEF, glibc,
  Apple's libm) is accurate to 1 ulp, so two CPUs may disagree by 2 ulp on ``f_k``: a relative
  ``2 * 2**-23 = 4 u`` with ``u = 2**-24`` the float32 unit roundoff. The product is rounded
  (``u`` relative on each side) and sin/cos are 1-Lipschitz, so the features differ by at most
  ``(4u + 2u) |a|`` from the argument, plus each side's own sin/cos error (SLEEF's u35 kernels:
  3.5 ulp of a value <= 1, i.e. <= 4u each): ``delta(a) = u (6 |a| + 8)``. For ``t = 999``,
  ``f = 1`` that is 3.6e-4, far above the 1e-6 a same-machine comparison shows.
* **Accumulation order** of matmuls, convolutions and reductions (AVX-512 vs AVX2 vs scalar
  kernels, thread count). A float32 model's result differs from exact arithmetic by a few
  ``u`` times the size of the sums; the golden files carry float64 outputs of the official code,
  so those comparisons are made in float64 where this term is ~1e-16.

:func:`propagated_bound` carries ``delta`` through a model to its output with the first-order
rule ``|d out_i| <= sum_k |d out_i / d e_k| delta_k`` (float64 central differences), doubled to
cover the second-order term. Where a golden file holds the generator's own features (its
``aux`` tables), tests feed those (:func:`golden_features`) and nothing needs propagating. ``ZOO_SIN_ULP=±1`` (tests/conftest.py)
moves every float32 sinusoid argument by one ulp, emulating another CPU on this one.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Callable, Iterator

import torch
from torch import Tensor

U32 = 2.0**-24  # float32 unit roundoff (half an ulp of 1)
U64 = 2.0**-53  # float64 unit roundoff

# Modules that call timestep_sinusoid; the model code looks the name up in these at call time.
_SINUSOID_USERS = ("zoo.conditioning.embeddings", "zoo.backbones.uvit", "zoo.backbones.dimr_branch")


def sinusoid_angles(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """``|t| * f_k`` in float64, shaped like ``timestep_sinusoid``'s output (cos half, sin half, pad)."""
    t = torch.as_tensor(t).reshape(-1).double()
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64) / half)
    angles = (t[:, None] * freqs[None]).abs()
    out = torch.cat([angles, angles], dim=-1)
    return torch.nn.functional.pad(out, (0, dim % 2))


def sinusoid_bound(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Largest difference between two CPUs' float32 ``timestep_sinusoid(t, dim)``, per element.

    ``delta(a) = u (6 |a| + 8)``, see the module docstring; the zero padding column is exact.
    """
    bound = U32 * (6 * sinusoid_angles(t, dim, max_period) + 8)
    if dim % 2:
        bound[:, -1] = 0
    return bound


@contextlib.contextmanager
def shift_sinusoid_arguments(ulps: int) -> Iterator[None]:
    """Within the block, float32 ``sin``/``cos`` see their argument ``ulps`` ulps away (another CPU)."""
    originals = {name: getattr(torch, name) for name in ("sin", "cos")}
    methods = {name: getattr(torch.Tensor, name) for name in ("sin", "cos")}

    def shifted(fn: Callable) -> Callable:
        def call(x: Tensor, *args, **kwargs):
            if isinstance(x, Tensor) and x.dtype == torch.float32:
                target = torch.full_like(x, math.inf if ulps > 0 else -math.inf)
                for _ in range(abs(ulps)):  # 0 stays 0: t = 0 gives a = 0 exactly on any CPU
                    x = torch.where(x == 0, x, torch.nextafter(x, target))
            return fn(x, *args, **kwargs)

        return call

    try:
        for name, fn in originals.items():
            setattr(torch, name, shifted(fn))
        for name, fn in methods.items():
            setattr(torch.Tensor, name, shifted(fn))
        yield
    finally:
        for name, fn in originals.items():
            setattr(torch, name, fn)
        for name, fn in methods.items():
            setattr(torch.Tensor, name, fn)


@contextlib.contextmanager
def fixed_sinusoid(features: Tensor) -> Iterator[None]:
    """Within the block, every ``timestep_sinusoid`` call returns ``features`` (any dtype)."""
    import importlib

    modules = [importlib.import_module(name) for name in _SINUSOID_USERS]
    saved = [m.timestep_sinusoid for m in modules]
    try:
        for m in modules:
            m.timestep_sinusoid = lambda t, dim, max_period=10000.0: features
        yield
    finally:
        for m, fn in zip(modules, saved):
            m.timestep_sinusoid = fn


def golden_features(known_t: Tensor, known: Tensor, t: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """The generating machine's float32 time features for ``t`` where the golden file holds them
    (``known`` at ``known_t``), else ours; and how far each may be from the generator's (0 where known)."""
    from zoo.conditioning.embeddings import timestep_sinusoid

    ours, delta = timestep_sinusoid(t, dim), sinusoid_bound(t, dim)
    for i, value in enumerate(t.double().tolist()):
        match = (known_t.double() == value).nonzero()
        if len(match) and known.shape[1] == dim:
            ours[i], delta[i] = known[match[0, 0]], 0
    return ours, delta


def propagated_bound(model: torch.nn.Module, inputs: tuple, features: Tensor, delta: Tensor, chunk: int = 64) -> list[Tensor]:
    """``2 * sum_k |d out / d e_k| delta_k`` per element of each output of ``model(*inputs)``.

    ``model`` is a float64 copy whose time features (``timestep_sinusoid``) are ``features``
    (B, D), each off by up to ``delta`` (B, D) from the generator's. The derivative times
    ``delta_k`` is the central difference ``|F(e + delta_k) - F(e - delta_k)| / 2`` (exact to
    second order; the factor 2 covers the rest). Samples are independent, so only the rows
    with a nonzero ``delta`` run, each feature column as one block of a batch.
    """
    features, delta = features.double(), delta.double()
    batch_size = features.shape[0]
    rows = delta.any(1)
    with torch.no_grad(), fixed_sinusoid(features):
        outs = model(*inputs)
    outs = list(outs) if isinstance(outs, (list, tuple)) else [outs]
    total = [torch.zeros_like(o) for o in outs]
    if not bool(rows.any()):
        return total
    sub = [a[rows] if isinstance(a, Tensor) and a.dim() and a.shape[0] == batch_size else a for a in inputs]
    value, dvalue = features[rows], delta[rows]
    columns = [k for k in range(value.shape[1]) if bool(dvalue[:, k].any())]
    for start in range(0, len(columns), chunk):
        cols = columns[start : start + chunk]
        n = len(cols)
        batch = value.repeat(2 * n, 1).view(2 * n, *value.shape)
        for j, k in enumerate(cols):
            batch[j, :, k] += dvalue[:, k]
            batch[n + j, :, k] -= dvalue[:, k]
        repeated = [a.repeat(2 * n, *[1] * (a.dim() - 1)) if isinstance(a, Tensor) and a.dim() else a for a in sub]
        with torch.no_grad(), fixed_sinusoid(batch.view(-1, value.shape[1])):
            moved = model(*repeated)
        for acc, o in zip(total, moved if isinstance(moved, (list, tuple)) else [moved]):
            o = o.view(2 * n, -1, *o.shape[1:])
            acc[rows] += ((o[:n] - o[n:]).abs() / 2).sum(0)
    return [2 * t for t in total]


@functools.lru_cache(maxsize=None)
def dit_cfg_budget() -> tuple[Tensor, Tensor]:
    """Time features and output error budget for the DiT golden file's ``cfg_test`` (computed once).

    Its t = 250, 700 are not in the file's ``aux`` tables, so ours are used and may be up to
    ``sinusoid_bound`` from the generator's; carried through the float64 model on
    ``[x[:2]; x[:2]]`` and through the guidance rule ``u + s (c - u)`` on channels 0..2, which
    moves by at most ``s dc + |1 - s| du``. Rows: cond then uncond, as the official call.
    """
    import copy
    from pathlib import Path

    from zoo.parity import build_official_model

    golden = torch.load(Path(__file__).parent / "golden" / "golden_dit_tiny.pt", weights_only=True)
    case, aux = golden["cfg_test"], golden["aux"]
    x, t, y, s = (case["inputs"][k] for k in ("x", "t", "y", "cfg_scale"))
    features, delta = golden_features(aux["timestep_embedding_t"], aux["timestep_embedding_dim256"], t, 256)
    model = copy.deepcopy(build_official_model("dit", golden["config"], golden["state_dict"])).double()
    half = x[: len(x) // 2]
    (raw,) = propagated_bound(model, (torch.cat([half, half]).double(), t, y), features, delta)
    cond, uncond = raw[:, :3].chunk(2)
    guided = s * cond + abs(1 - s) * uncond
    return features, torch.cat([torch.cat([guided, guided]), raw[:, 3:]], dim=1)
