"""The conditioning contract shared by every block, conditioner and backbone.

A backbone packs what conditioners may need into one small :class:`Conditioning` object
and hands it to each block; each conditioner takes what it needs from it:

* adaLN-Zero reads ``emb`` (the time/class embedding) and returns a residual gate;
* time-dependent norms (TD-LN, TD-RMSNorm) read ``t``;
* plain norms and the time token read nothing (the time token acts on the token sequence,
  in the backbone).

Every conditioner is a norm: ``forward(x, cond) -> (h, gate)`` where ``gate`` is ``None`` or
a tensor to scale the residual branch with (:func:`apply_gate`). ``x`` has channels last,
``(B, L, C)`` for tokens or ``(B, H, W, C)`` for feature maps; per-sample tensors of shape
``(B, C)`` are broadcast over the middle dimensions with :func:`per_sample`.

Every conditioner constructor takes ``(dim, cond_dim=None, **own_options)``: blocks call
their norm factory as ``norm(dim, cond_dim=cond_dim)`` and never know which one they got.
Conditioner classes declare what the backbone must provide through class attributes:

* ``needs_embedding``: the backbone must build a time (+ class) embedding of width ``cond_dim``;
* ``adds_time_token``: the backbone must prepend a time token to the sequence.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Callable

import torch
from torch import Tensor, nn

from zoo.errors import ContractError, UserError
from zoo.introspect import signature


@dataclass(frozen=True)
class Conditioning:
    """What a block may be conditioned on.

    Attributes:
        t: the time exactly as the backbone received it, shape ``(B,)`` (or a scalar).
        emb: the time (+ class) embedding, ``(B, cond_dim)``, when a conditioner needs one.
        y: class labels ``(B,)`` or ``None``.
    """

    t: Tensor
    emb: Tensor | None = None
    y: Tensor | None = None

    def with_embedding(self, emb: Tensor | None) -> "Conditioning":
        """A copy carrying another embedding (e.g. one per DiMR branch width)."""
        return replace(self, emb=emb)


def per_sample(v: Tensor, x: Tensor) -> Tensor:
    """View a per-sample ``(B, C)`` (or shared ``(C,)``) tensor so it broadcasts over ``x``'s middle dims."""
    if v.ndim == 1:
        return v
    return v.view(v.shape[0], *([1] * (x.ndim - 2)), v.shape[-1])


def apply_gate(h: Tensor, gate: Tensor | None) -> Tensor:
    """Scale a residual branch by a conditioner's gate (adaLN-Zero's alpha), if any."""
    return h if gate is None else per_sample(gate, h) * h


def add_gated(x: Tensor, h: Tensor, gate: Tensor | None) -> Tensor:
    """``x + gate·h`` (``x + h`` without a gate) in one pass over the tokens."""
    return x + h if gate is None else torch.addcmul(x, per_sample(gate, h), h)


def check_conditioning(cond: Any, what: str) -> None:
    """Refuse a ``cond`` that is neither ``None`` nor a :class:`Conditioning`.

    A bare time tensor passed where a :class:`Conditioning` belongs (a block or conditioner used on
    its own) would otherwise fail far away: its ``.t`` is the tensor's transpose method and it has
    no ``.emb``.
    """
    if cond is not None and not isinstance(cond, Conditioning):
        raise ContractError(f"{what} must be a Conditioning, got {type(cond).__name__}",
                            suggestion="pass Conditioning(t=t) (conditioning.base; emb= and y= as its conditioners need)")


def norm_and_gate(norm: nn.Module, x: Tensor, cond: Conditioning) -> tuple[Tensor, Tensor | None]:
    """``norm(x, cond)``, checked to be the ``(h, gate)`` pair the conditioner contract promises.

    A plugin conditioner that returns a bare tensor would otherwise be unpacked along its batch
    dimension: a confusing unpack error, or at batch 2 a silently wrong ``h`` and ``gate``. A ``cond`` that
    is not a :class:`Conditioning` (a bare time tensor, from a block used on its own) is named here too:
    its ``.t`` is the tensor's transpose method.
    """
    check_conditioning(cond, "a block's cond")
    out = norm(x, cond)
    if type(out) is not tuple or len(out) != 2 or not (out[1] is None or isinstance(out[1], Tensor)):
        got = f"a tuple of {len(out)}" if isinstance(out, tuple) else type(out).__name__
        raise ContractError(
            f"conditioner {type(norm).__name__} ({type(norm).__module__}) returned {got}; a conditioner's "
            "forward(x, cond) must return (h, gate): the normalised x and None or a per-sample gate for the "
            "residual branch", suggestion="return (h, None) from a conditioner without a gate")
    return out


def conditioner_class(factory: Callable[..., Any]) -> type:
    """The class behind a conditioner factory (a class or a ``functools.partial`` of one)."""
    while hasattr(factory, "func"):
        factory = factory.func
    return factory  # type: ignore[return-value]


def bind_unset(factory: Callable[..., Any], name: str, value: Any) -> Callable[..., Any]:
    """The factory with ``name=value`` bound where its conditioner takes ``name`` and no one set it yet
    (a value the recipe set, at any depth of nested partials, is kept)."""
    sig = signature(conditioner_class(factory))
    if sig is None or name not in sig.parameters:
        return factory
    f = factory
    while hasattr(f, "func"):
        if name in (getattr(f, "keywords", None) or {}):
            return factory
        f = f.func
    return partial(factory, **{name: value})


def without_gate(factory: Callable[..., Any], key_path: str) -> Callable[..., Any]:
    """The factory with the residual gate switched off (``gate=False``) where the conditioner has one.

    For norms whose gate nothing reads (DiMR's hand-on and head norms, U-ViT's head norm): with
    adaLN-Zero there they would otherwise allocate a third of their modulation Linear that never
    gets a gradient and still counts as parameters. A recipe's ``gate: true`` there (at ``key_path``)
    is refused, as it would allocate exactly those parameters.
    """
    f = factory
    while hasattr(f, "func"):
        if (getattr(f, "keywords", None) or {}).get("gate") is True:
            raise UserError("this norm's gate is never read: gate: true would allocate parameters that never train",
                            key_path=f"{key_path}.gate", suggestion="drop gate, or set gate: false")
        f = f.func
    return bind_unset(factory, "gate", False)


def needs_embedding(factory: Callable[..., Any]) -> bool:
    """Whether blocks built with this conditioner need a time/class embedding."""
    return bool(getattr(conditioner_class(factory), "needs_embedding", False))


def adds_time_token(factory: Callable[..., Any]) -> bool:
    """Whether this conditioner asks the backbone to prepend a time token."""
    return bool(getattr(conditioner_class(factory), "adds_time_token", False))


def time_blind(module: nn.Module, *norms: Callable[..., Any] | None) -> bool:
    """True when every conditioner inside ``module`` declares ``ignores_time`` (the plain norms):
    then the time reaches no layer and the network predicts the same at every noise level.
    Conditioners are the modules whose class declares ``needs_embedding`` (zoo's own) or is the class
    of one of the ``norms`` factories the backbone was given (a plugin's need declare nothing); one
    that does not declare ``ignores_time`` (every other, plugins included) counts as reading time."""
    given = {conditioner_class(f) for f in norms if f is not None}
    kinds = [type(m) for m in module.modules() if hasattr(type(m), "needs_embedding") or type(m) in given]
    return bool(kinds) and all(getattr(k, "ignores_time", False) for k in kinds)


def as_time_vector(t: Tensor | float, batch: int, device: torch.device) -> Tensor:
    """Time as a ``(B,)`` tensor: a number, a 0-dim or one-element tensor is every sample's time, and ``B``
    values (``(B,)`` or ``(B, 1)``) are one per sample. Anything else is a :class:`UserError` naming
    what was given (it used to surface as a broadcast error deep in a layer, or ran in one backbone
    and failed in another)."""
    from zoo.errors import UserError

    given = t
    try:
        t = torch.as_tensor(t, device=device)
    except (TypeError, ValueError, RuntimeError):
        raise UserError(f"t must be a number or a tensor of {batch} times, got {type(given).__name__}") from None
    if t.dtype == torch.bool or t.is_complex():
        raise UserError(f"t must be real numbers, got {t.dtype}")
    if t.numel() == 1:
        return t.reshape(()).expand(batch)
    if t.numel() != batch or (t.ndim > 1 and max(t.shape) != batch):
        raise UserError(f"t must be one time or {batch} times (shape ({batch},)) for a batch of {batch}, "
                        f"got shape {tuple(t.shape)}")
    return t.reshape(batch)
