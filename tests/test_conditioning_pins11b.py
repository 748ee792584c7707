"""Pins on the conditioners that mutation testing (round 11b) found unheld: the plain ``layernorm`` /
``rmsnorm`` conditioners' (and U-ViT's time token's) ``affine`` switch and default eps, and the fused RMS
norm's float32 compute for bfloat16 inputs (its docstring promises fp16 *and* bf16; only fp16 was held),
TD-RMSNorm's released eps 1e-8, and ``reset_parameters`` of the time-dependent parameters (the PyTorch
re-initialisation protocol: a meta-built model materialised with ``to_empty`` re-inits through it)."""

from __future__ import annotations

import pytest
import torch

from zoo.conditioning.base import Conditioning
from zoo.conditioning.fused_rmsnorm import scaled_rms_norm
from zoo.conditioning.layernorm import LayerNorm, RMSNorm
from zoo.conditioning.time_dependent import (InterpolatedPair, PaperTimeDependentLayerNorm, TimeDependentParameter,
                                             TimeDependentRMSNorm)
from zoo.conditioning.time_token import TimeToken

pytestmark = pytest.mark.usefixtures("one_thread")


def _ln(x, eps):
    return (x - x.mean(-1, keepdim=True)) / (x.var(-1, unbiased=False, keepdim=True) + eps).sqrt()


def _rms(x, eps):
    return x / (x.square().mean(-1, keepdim=True) + eps).sqrt()


@pytest.mark.parametrize("cls, formula, eps, per_channel",
                         [(LayerNorm, _ln, 1e-5, 2), (TimeToken, _ln, 1e-5, 2), (RMSNorm, _rms, 1e-6, 1)],
                         ids=["layernorm", "time_token", "rmsnorm"])
def test_plain_norms_follow_affine_and_their_default_eps(cls, formula, eps, per_channel):
    """``affine=False`` builds a norm with no parameters (a recipe's ``norm: {type: layernorm, affine: false}``);
    a norm that built γ (and β) anyway trained and counted C (2C) parameters per norm the recipe switched off.
    The default eps is U-ViT's 1e-5 for LayerNorm and 1e-6 for RMSNorm, inside the square root."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, dtype=torch.float64) * 1e-3  # small rows: eps moves the result by ~1e-1 / ~1e-3
    bare = cls(8, affine=False).double()
    assert list(bare.parameters()) == []
    out, gate = bare(x, Conditioning(t=torch.zeros(2)))
    assert gate is None
    torch.testing.assert_close(out, formula(x, eps), rtol=1e-12, atol=1e-12)
    full = cls(8).double()
    assert sum(p.numel() for p in full.parameters()) == per_channel * 8
    with torch.no_grad():
        for p in full.parameters():
            p.normal_()
    weight = full.weight
    bias = full.bias if per_channel == 2 else torch.zeros(8, dtype=torch.float64)
    torch.testing.assert_close(full(x)[0], formula(x, eps) * weight + bias, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("grad", [False, True], ids=["plain", "fused"])
def test_bf16_rms_norm_is_the_float32_norm_rounded_once(grad):
    """bf16 autocast runs DiMR's TD-RMSNorm in float32 and rounds the result once: a norm that kept bf16
    (only fp16 upcast) rounded r, x·r and the product with γ each to 8 bits, and its backward summed
    Σ_c a·x in bf16; values and gradients then differ from the float32 ones rounded to bf16."""
    torch.manual_seed(0)
    x = torch.randn(3, 5, 64).bfloat16()
    gamma = (1 + 0.1 * torch.randn(3, 64)).bfloat16()
    xf, gf = x.float().requires_grad_(grad), gamma.float().requires_grad_(grad)
    expected = scaled_rms_norm(xf, gf, 1e-8)
    xb, gb = x.clone().requires_grad_(grad), gamma.clone().requires_grad_(grad)
    y = scaled_rms_norm(xb, gb, 1e-8)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, expected.bfloat16())
    if grad:
        upstream = torch.randn(3, 5, 64).bfloat16()
        y.backward(upstream)
        expected.backward(upstream.float())
        assert xb.grad.dtype == gb.grad.dtype == torch.bfloat16
        assert torch.equal(xb.grad, xf.grad.bfloat16())
        assert torch.equal(gb.grad, gf.grad.bfloat16())


def test_td_rmsnorm_default_eps_is_the_released_1e_8_added_to_the_rms():
    """DiMR's TD-RMSNorm adds eps = 1e-8 to the RMS: a default of 1e-6 shrank rows of RMS ~1e-6 (late
    layers of a small model at init, zero-padded tokens) by half instead of normalising them to 1."""
    torch.manual_seed(0)
    norm = TimeDependentRMSNorm(8).double()
    x = torch.randn(2, 3, 8, dtype=torch.float64) * 1e-6
    out, gate = norm(x, Conditioning(t=torch.tensor([0.5, -0.5], dtype=torch.float64)))
    assert gate is None
    rms = x.square().mean(-1, keepdim=True).sqrt()
    torch.testing.assert_close(out, x / (rms + 1e-8), rtol=1e-12, atol=1e-12)  # γ(τ) = 1 at init


def test_reset_parameters_restores_the_time_independent_init():
    """``reset_parameters`` puts every time-dependent parameter back to p0 = p1 = init and w = b = 0 (slope 1),
    as the constructor does: a reset that zeroed a scale's p0 or set w to 1 re-initialised a meta-built or
    re-initialised model to a norm whose output depends on time from step 0 (or halves its scale)."""
    torch.manual_seed(0)
    modules = [TimeDependentParameter(4, 1.0), TimeDependentParameter(4, 0.0), TimeDependentParameter(4, 1.0, False),
               InterpolatedPair(4, 0.0), PaperTimeDependentLayerNorm(4)]
    fresh = [{k: v.clone() for k, v in m.state_dict().items()} for m in modules]
    for m, before in zip(modules, fresh):
        with torch.no_grad():
            for p in m.parameters():
                p.normal_()
        for sub in m.modules():
            if hasattr(sub, "reset_parameters"):
                sub.reset_parameters()
        after = m.state_dict()
        assert after.keys() == before.keys()
        for k in before:
            assert torch.equal(after[k], before[k]), k
    scale = modules[0]
    assert torch.equal(scale(torch.tensor([-3.0, 0.0, 7.0])), torch.ones(3, 4))  # time-independent again
