"""DiMR's RMS norm ``x / (‖x‖₂/√C + eps) · γ`` as one autograd function with a hand-written backward.

Autograd through the plain expression saves two full-size tensors (``x`` for the norm and
``x·r`` for the product with ``γ``) and runs a masked fill, a division and five broadcast
products in backward. Here only ``x`` is saved (with the per-row norm and reciprocal, 1/C of
its size) and the backward is two reductions and three passes:

    r = 1 / (‖x‖/√C + eps),  y = x·r·γ
    a = g·γ,   s = Σ_c a·x,   ∂x = r·a − (s·r² / (√C·‖x‖))·x   (second term 0 where ‖x‖ = 0)
    ∂γ = Σ over rows of g·x·r   (per sample for a (B, C) γ, over everything for a shared (C,) γ)

The forward is the eager expression's own op order, so its outputs are bit-identical.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from zoo.tracing import under_func_transform

from .base import per_sample


def rms_scale(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """``(‖x‖₂, 1 / (‖x‖₂/√C + eps))`` over the last dim, kept as ``(..., 1)``."""
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return norm, (norm * x.shape[-1] ** -0.5 + eps).reciprocal()


class _ScaledRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, gamma: Tensor, eps: float) -> Tensor:  # type: ignore[override]
        norm, r = rms_scale(x, eps)
        ctx.save_for_backward(x, gamma, norm, r)
        return (x * r).mul_(per_sample(gamma, x))

    @staticmethod
    @once_differentiable
    def backward(ctx, g: Tensor) -> tuple[Tensor | None, Tensor | None, None]:  # type: ignore[override]
        x, gamma, norm, r = ctx.saved_tensors
        grad_x = grad_gamma = None
        if ctx.needs_input_grad[1]:
            gx = g * x
            if gamma.ndim == 1:
                grad_gamma = gx.mul_(r).reshape(-1, x.shape[-1]).sum(0)
            else:  # per sample: Σ_rows r·(g·x) as a (1 × rows) @ (rows × C) product, one read of g·x
                batch = x.shape[0]
                grad_gamma = torch.bmm(r.reshape(batch, 1, -1), gx.reshape(batch, -1, x.shape[-1])).squeeze(1)
        if ctx.needs_input_grad[0]:
            a = g * per_sample(gamma, x)
            s = (a * x).sum(-1, keepdim=True)
            coef = s.mul_(r.square()).div_(norm * x.shape[-1] ** 0.5)
            coef = torch.where(norm > 0, coef, 0.0)  # as autograd's norm backward: no gradient through ‖0‖
            grad_x = a.mul_(r).addcmul_(x, coef, value=-1)
        return grad_x, grad_gamma, None


def scaled_rms_norm(x: Tensor, gamma: Tensor, eps: float) -> Tensor:
    """``x / (‖x‖₂/√C + eps) · γ`` with ``γ`` of shape ``(C,)`` or per sample ``(B, C)``.

    The fused function when autograd is recording; the plain expression otherwise (same values), and
    under ``torch.func`` transforms, which differentiate it themselves.
    Half-precision inputs (fp16/bf16 autocast) are normalised in float32 and the result cast back,
    as LLaMA's and T5's RMS norms do: in fp16 ``eps = 1e-8`` rounds to 0 and the backward's ``r²``
    overflows (65504) once a row's RMS falls below ~4e-3, which made every fp16 step of a small
    DiMR non-finite.
    """
    low = x.dtype in (torch.float16, torch.bfloat16)
    xc, gc = (x.float(), gamma.float()) if low else (x, gamma)
    if torch.is_grad_enabled() and (x.requires_grad or gamma.requires_grad) and not under_func_transform():
        y = _ScaledRMSNorm.apply(xc, gc, eps)
    else:
        _, r = rms_scale(xc, eps)
        y = xc * r * per_sample(gc, xc)
    return y.to(x.dtype) if low else y
