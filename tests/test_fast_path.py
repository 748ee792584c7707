"""The training fast path computes what the plain eager expressions compute, values and gradients."""

from __future__ import annotations

import pytest
import torch

import zoo

from zoo.blocks.geglu import geglu_gate
from zoo.blocks.mlp import GeGluMlp
from zoo.conditioning.base import Conditioning, per_sample
from zoo.conditioning.fused_rmsnorm import scaled_rms_norm
from zoo.conditioning.time_dependent import TimeDependentRMSNorm


def _reference(x: torch.Tensor, gamma: torch.Tensor, eps: float) -> torch.Tensor:
    """The released formula, through plain autograd."""
    rms = torch.linalg.vector_norm(x, dim=-1, keepdim=True) / x.shape[-1] ** 0.5
    return x / (rms + eps) * per_sample(gamma, x)


@pytest.mark.parametrize("shape, gamma_shape", [((3, 5, 8), (3, 8)), ((2, 3, 4, 6), (2, 6)), ((4, 7), (7,)),
                                                ((2, 5, 8), (8,))])
def test_fused_rms_norm_gradcheck(shape, gamma_shape):
    """Hand-written backward against finite differences in float64 (tokens, maps, shared γ)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64, generator=g, requires_grad=True)
    gamma = torch.randn(gamma_shape, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: scaled_rms_norm(a, b, 1e-8), (x, gamma))


def test_fused_rms_norm_matches_autograd_float64_with_zero_rows():
    """Values and both gradients equal plain autograd's to float64 rounding, a zero row included."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 10, 16, dtype=torch.float64, generator=g)
    x[1, 4] = 0.0  # ‖x‖ = 0: no gradient through the norm (autograd masks it), r = 1/eps
    gamma = torch.randn(3, 16, dtype=torch.float64, generator=g)
    up = torch.randn(3, 10, 16, dtype=torch.float64, generator=g)
    grads = []
    for fn in (scaled_rms_norm, _reference):
        xa, ga = x.clone().requires_grad_(), gamma.clone().requires_grad_()
        out = fn(xa, ga, 1e-8)
        out.backward(up)
        grads.append((out.detach(), xa.grad, ga.grad))
    for ours, ref in zip(*grads):
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads[0][1][1, 4], up[1, 4] * gamma[1] / 1e-8, rtol=1e-14, atol=0)  # r·a alone


def test_td_rmsnorm_float32_forward_is_bit_identical_to_released_expression():
    """Forward op order is the eager expression's (x · (rms + eps)⁻¹ · γ): identical float32 bits."""
    norm = TimeDependentRMSNorm(32)
    with torch.no_grad():
        for p in norm.parameters():
            p.normal_()
    x = torch.randn(4, 9, 32, requires_grad=True)
    t = torch.randn(4)
    out, _ = norm(x, Conditioning(t=t))
    gamma = norm.weight(t * norm.time_scale)
    rms = torch.linalg.vector_norm(x, dim=-1, keepdim=True) * 32**-0.5
    assert torch.equal(out, x * (rms + norm.eps).reciprocal() * per_sample(gamma, x))


@pytest.mark.parametrize("act", ["gelu", "gelu_tanh"])
def test_geglu_gate_gradcheck(act):
    """The in-place backward of act(a)·b against finite differences in float64."""
    h = torch.randn(2, 3, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2), requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: geglu_gate(v, act), (h,))


@pytest.mark.parametrize("act", ["gelu", "gelu_tanh"])
def test_geglu_mlp_float32_bit_identical_to_chunked_autograd(act):
    """Same ops on the same numbers as chunk + GELU + product through autograd: identical bits."""
    torch.manual_seed(3)
    mlp = GeGluMlp(12, hidden_features=10, act=act)
    x = torch.randn(2, 5, 12)
    up = torch.randn(2, 5, 12)
    results = []
    for fast in (True, False):
        mlp.zero_grad()
        xa = x.clone().requires_grad_()
        if fast:
            out = mlp(xa)
        else:
            gate, value = mlp.fc1(xa).chunk(2, dim=-1)
            out = mlp.fc2(mlp.act(gate) * value)
        out.backward(up)
        results.append([out.detach(), xa.grad, mlp.fc1.weight.grad.clone(), mlp.fc1.bias.grad.clone()])
    for ours, ref in zip(*results):
        assert torch.equal(ours, ref)


@pytest.mark.parametrize("recipe", ["dit", "uvit"])
def test_token_stream_is_contiguous_so_norms_do_not_copy(recipe):
    """The patch embedding hands on a token-major contiguous stream: a transposed view would make every
    residual sum inherit its strides and every LayerNorm copy its input (DiT-S/2: 50 copies a step)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from zoo.backbones.common import PatchEmbed

    class NormInputs(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen: list[bool] = []  # per LayerNorm call: was its input contiguous

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.native_layer_norm.default:
                self.seen.append(args[0].is_contiguous())
            return func(*args, **(kwargs or {}))

    tokens = PatchEmbed(4, 8, 2)(torch.randn(2, 4, 8, 8))
    assert tokens.shape == (2, 16, 8) and tokens.is_contiguous()
    model = zoo.build_model({"model": {"type": recipe, "depth": 2, "num_heads": 2, "num_classes": 3,
                                       **({"input_size": 8, "hidden_size": 8, "patch_size": 2, "in_channels": 4}
                                          if recipe == "dit" else
                                          {"img_size": 8, "embed_dim": 8, "patch_size": 2, "in_chans": 4})}})
    with NormInputs() as mode:
        model(torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.tensor([0, 2]))
    assert len(mode.seen) >= 4 and all(mode.seen)
