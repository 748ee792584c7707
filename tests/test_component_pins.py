"""Pins on components whose documented behaviour no other test held: the time scale of TD norms in
DiT and U-ViT, the paper TD-LN's initial shift, the MLP width rule, GeGLU's halves and default width,
and the official FLOP convention's norms without an affine weight (against stock fvcore)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import zoo
from zoo.blocks.mlp import GeGluMlp, mlp_width
from zoo.conditioning.base import Conditioning
from zoo.conditioning.time_dependent import PaperTimeDependentLayerNorm, TimeDependentLayerNorm
from zoo.flops import count_flops

pytestmark = pytest.mark.usefixtures("one_thread")

_DIT = dict(type="dit", input_size=4, patch_size=2, in_channels=3, hidden_size=16, depth=1, num_heads=2,
            num_classes=5, norm="td_layernorm")
_UVIT = dict(type="uvit", img_size=4, patch_size=2, in_chans=3, embed_dim=16, depth=1, num_heads=2,
             num_classes=5, norm="td_layernorm")


def _expected_td_layernorm(norm: TimeDependentLayerNorm, x: torch.Tensor, tau: float) -> torch.Tensor:
    """``LN(x)·γ(τ) + β(τ)`` written out from the module docstring's formula, θ = p1 + σ((1+w)τ + b)(p0 − p1)."""
    def theta(p):
        s = torch.sigmoid((1 + p.w) * tau + p.b)
        return p.p1 + s * (p.p0 - p.p1)

    return F.layer_norm(x, (norm.dim,), eps=norm.eps) * theta(norm.weight) + theta(norm.bias)


@pytest.mark.parametrize("spec", [_DIT, _UVIT], ids=["dit", "uvit"])
def test_td_layernorm_in_a_step_time_backbone_reads_t_500_as_tau_1(spec):
    """DiT / U-ViT bind time_scale 1/500 to TD norms (t = DDPM step): a scale of 1/1000 went unnoticed."""
    torch.manual_seed(0)
    model = zoo.build_model(spec).double().eval()
    norms = [m for m in model.modules() if isinstance(m, TimeDependentLayerNorm)]
    assert norms
    with torch.no_grad():
        for norm in norms:  # p0 != p1: the value depends on the gate, so on τ
            for p in (norm.weight, norm.bias):
                p.p0.normal_()
                p.p1.normal_()
                p.w.normal_(std=0.5)
                p.b.normal_(std=0.5)
    seen = []
    hooks = [m.register_forward_hook(lambda mod, args, out: seen.append((mod, args[0], out[0]))) for m in norms]
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    t = torch.full((2,), 500, dtype=torch.long if spec["type"] == "dit" else torch.float64)
    try:
        with torch.no_grad():
            model(x, t, torch.tensor([0, 1]))
    finally:
        for h in hooks:
            h.remove()
    assert seen
    for norm, h, out in seen:
        # float64 end to end: the same ops in another order, error ~1e-15 of values of size ~5
        torch.testing.assert_close(out, _expected_td_layernorm(norm, h, 1.0), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("t", [0.0, 1.0, 250.0, -3.0])
def test_paper_td_layernorm_starts_as_a_plain_layernorm(t):
    """The paper TD-LN's shift β starts at 0 (p3 = p4 = 0): an init of 1 shifted every output by 1."""
    torch.manual_seed(0)
    norm = PaperTimeDependentLayerNorm(6).double()
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    for cond_t in (torch.tensor(t, dtype=torch.float64), torch.full((2,), t, dtype=torch.float64)):
        out, gate = norm(x, Conditioning(t=cond_t))
        assert gate is None
        torch.testing.assert_close(out, F.layer_norm(x, (6,), eps=1e-5), rtol=0, atol=1e-14)


def test_mlp_width_takes_a_product_one_rounding_below_an_integer_as_that_integer():
    """mlp_width's doc: a ratio given as hidden/dim lands on hidden; truncating 229.99999999999997 gave 229."""
    assert 224 * (230 / 224) < 230  # the case: one rounding below
    assert mlp_width(224, 230 / 224) == 230
    assert mlp_width(384, 2.7) == 1036  # and a true fraction still truncates (the docstring's example)


def test_geglu_mlp_gates_the_first_half_of_fc1():
    """GeGluMlp's doc: the first half of fc1's output is the gated one; act(b)·a for act != GELU went unseen."""
    torch.manual_seed(0)
    mlp = GeGluMlp(6, hidden_features=5, act="silu").double()
    x = torch.randn(3, 6, dtype=torch.float64)
    a, b = mlp.fc1(x).chunk(2, dim=-1)  # [a | b]: a the first half
    with torch.no_grad():
        out = mlp(x)
    torch.testing.assert_close(out, mlp.fc2(F.silu(a) * b), rtol=1e-13, atol=1e-13)
    assert not torch.allclose(out, mlp.fc2(F.silu(b) * a))  # the other order differs here


def test_geglu_mlp_default_hidden_width_is_twice_the_input():
    """GeGluMlp without hidden_features is DiMR's ratio 2 (fc1 2·hidden = 4·dim wide); 4·dim hidden was built."""
    mlp = GeGluMlp(8)
    assert mlp.fc1.out_features == 2 * 16 and mlp.fc2.in_features == 16
    assert mlp.fc1.out_features == GeGluMlp(8, hidden_features=mlp_width(8, 2.0)).fc1.out_features


# --- official FLOP convention: norms without an affine weight, as stock fvcore counts them -----------


class _UnweightedNorms(nn.Module):
    """GroupNorm, BatchNorm with running statistics and BatchNorm on batch statistics, none affine."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.gn = nn.GroupNorm(2, 8, affine=False)
        self.bn = nn.BatchNorm2d(8, affine=False)  # eval: running statistics (fvcore: 1 per element)
        self.bn_batch = nn.BatchNorm2d(8, affine=False, track_running_stats=False)  # batch statistics (4)

    def forward(self, x):
        return self.bn_batch(self.bn(self.gn(self.conv(x))))


def _stock_fvcore_gflops(model, inputs) -> float:
    """fvcore's own count with its default handles (the model as given, its train/eval mode included)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fvcore's import and jit tracing warn about torch.jit
        from fvcore.nn import FlopCountAnalysis

        analysis = FlopCountAnalysis(model, inputs)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
        return analysis.total() / 1e9


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_official_convention_counts_unweighted_norms_as_stock_fvcore(mode):
    """GroupNorm / BatchNorm without affine: 4 / 1 (running stats) / 4 (batch stats) per element as fvcore,
    not 5 / 2 / 5; a model in train mode is counted as it runs in eval (count_flops' doc)."""
    torch.manual_seed(0)
    model = _UnweightedNorms()
    model.train(mode == "train")
    x = torch.randn(2, 3, 4, 4)
    elements = 2 * 8 * 16
    conv = elements * 27
    official = count_flops(model, (x,), convention="official").gflops * 1e9
    assert official == pytest.approx(conv + elements * (4 + 1 + 4), abs=1e-3)
    assert model.training == (mode == "train")  # restored
    model.eval()  # count_flops counts in eval mode: fvcore on the model as it ran
    assert official == pytest.approx(_stock_fvcore_gflops(model, (x,)) * 1e9, abs=1e-3)
