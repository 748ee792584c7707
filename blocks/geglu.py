"""GeGLU's gate ``act(a) · b`` on a fused ``[a | b]`` projection, with a backward that writes in place.

Through plain autograd, ``chunk`` + activation + product end with the two half-width gradients
being concatenated into a new full-width tensor (one more read and write of ``2·hidden`` per
token). Here the backward writes both halves straight into one buffer laid out as the
projection's output. It saves what autograd saves (the projection output and ``act(a)``);
values and gradients are the same ops on the same numbers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from zoo.tracing import under_func_transform

APPROXIMATE = {"gelu": "none", "gelu_tanh": "tanh"}  # activations with an in-place backward here


class _Geglu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: Tensor, approximate: str) -> Tensor:  # type: ignore[override]
        a, b = h.chunk(2, dim=-1)
        act = F.gelu(a, approximate=approximate)
        ctx.approximate = approximate
        ctx.save_for_backward(h, act)
        return act * b

    @staticmethod
    @once_differentiable
    def backward(ctx, g: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        h, act = ctx.saved_tensors
        a, b = h.chunk(2, dim=-1)
        grad = torch.empty_like(h)
        grad_a, grad_b = grad.chunk(2, dim=-1)
        torch.mul(g, act, out=grad_b)
        torch.ops.aten.gelu_backward.grad_input(g * b, a, approximate=ctx.approximate, grad_input=grad_a)
        return grad, None


def geglu_gate(h: Tensor, act: str = "gelu") -> Tensor:
    """``act(a) · b`` for ``h = [a | b]`` on the last dim (the first half is gated)."""
    if torch.is_grad_enabled() and h.requires_grad and not torch.compiler.is_compiling() and not under_func_transform():
        # Under torch.compile the plain expression below is traced and fused instead: the Function's
        # backward writes into strided views (out=), which dynamo cannot trace; torch.func.grad/vmap
        # differentiate the plain expression themselves.
        return _Geglu.apply(h, APPROXIMATE[act])
    a, b = h.chunk(2, dim=-1)
    return F.gelu(a, approximate=APPROXIMATE[act]) * b
