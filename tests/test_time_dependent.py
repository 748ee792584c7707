"""Time-dependent norms: the formula, parameter counts, init (golden values: test_dimr_parity.py)."""

import pytest
import torch
import torch.nn.functional as F

from zoo.conditioning.base import Conditioning
from zoo.conditioning.time_dependent import (
    PaperTimeDependentLayerNorm,
    TimeDependentLayerNorm,
    TimeDependentParameter,
    TimeDependentRMSNorm,
    no_weight_decay_names,
)


def _perturb(module: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g))


def test_parameter_formula_and_init():
    theta = TimeDependentParameter(5, init=1.0)
    tau = torch.tensor([-1.0, 0.3])
    assert torch.equal(theta(tau), torch.ones(2, 5))  # p0 = p1 = init: time-independent at init
    _perturb(theta)
    expected = theta.p1 + torch.sigmoid((1 + theta.w) * tau[:, None] + theta.b) * (theta.p0 - theta.p1)
    torch.testing.assert_close(theta(tau), expected, rtol=0, atol=1e-6)
    assert theta(torch.tensor(0.3)).shape == (5,)
    torch.testing.assert_close(theta(torch.tensor(0.3)), theta(tau)[1])


@pytest.mark.parametrize(
    "cls, per_dim, extra", [(TimeDependentLayerNorm, 8, 0), (TimeDependentRMSNorm, 4, 0), (PaperTimeDependentLayerNorm, 4, 2)]
)
def test_parameter_counts(cls, per_dim, extra):
    assert sum(p.numel() for p in cls(24).parameters()) == per_dim * 24 + extra


def test_layernorm_matches_definition_per_sample_and_shared():
    norm = TimeDependentLayerNorm(16)
    _perturb(norm)
    x = torch.randn(3, 5, 16)
    t = torch.tensor([-4.0, 0.5, 3.2])
    h, gate = norm(x, Conditioning(t=t))
    assert gate is None
    tau = t * 0.25
    expected = F.layer_norm(x, (16,), eps=1e-5) * norm.weight(tau)[:, None] + norm.bias(tau)[:, None]
    torch.testing.assert_close(h, expected, rtol=0, atol=1e-5)
    shared, _ = norm(x, Conditioning(t=torch.tensor(0.5)))  # a scalar time takes the fused path
    torch.testing.assert_close(shared[1], h[1], rtol=0, atol=1e-5)


def test_rmsnorm_adds_eps_to_the_rms_and_takes_maps():
    norm = TimeDependentRMSNorm(8, eps=0.1)
    _perturb(norm)
    x = torch.randn(2, 4, 4, 8)  # (B, H, W, C) feature map
    t = torch.tensor([1.0, -2.0])
    h, _ = norm(x, Conditioning(t=t))
    rms = x.pow(2).mean(-1, keepdim=True).sqrt()
    expected = x / (rms + 0.1) * norm.weight(t * 0.25)[:, None, None]
    torch.testing.assert_close(h, expected, rtol=0, atol=1e-6)


def test_paper_form_shares_one_scalar_gate_between_gamma_and_beta():
    """Eq. 5-7: s(t) = σ(w·t + b), γ(t) = s·p1 + (1 − s)·p2, and β(t) 'formulated similarly with another two
    parameters p3 and p4': the same s. It had a second gate for β (4C + 4 parameters)."""
    norm = PaperTimeDependentLayerNorm(6).double()
    assert norm.weight.w.shape == (1,) and not hasattr(norm.bias, "w")
    _perturb(norm)
    x, t = torch.randn(2, 3, 6, dtype=torch.float64), torch.tensor([-1.0, 2.0], dtype=torch.float64)
    s = torch.sigmoid((1 + norm.weight.w) * t[:, None] * 0.25 + norm.weight.b)  # eq. 5, (B, 1)
    gamma = s * norm.weight.p0 + (1 - s) * norm.weight.p1  # eq. 6
    beta = s * norm.bias.p0 + (1 - s) * norm.bias.p1
    h, _ = norm(x, Conditioning(t=t))
    expected = F.layer_norm(x, (6,), eps=1e-5) * gamma[:, None] + beta[:, None]  # eq. 7
    torch.testing.assert_close(h, expected, rtol=0, atol=1e-12)
    shared, _ = norm(x, Conditioning(t=torch.tensor(2.0, dtype=torch.float64)))  # one time: the fused path
    torch.testing.assert_close(shared[1], h[1], rtol=0, atol=1e-12)


def test_time_changes_the_output_only_through_the_gates():
    norm = TimeDependentRMSNorm(8)
    x = torch.randn(2, 3, 8)
    a, _ = norm(x, Conditioning(t=torch.tensor([-4.0, -4.0])))
    b, _ = norm(x, Conditioning(t=torch.tensor([4.0, 4.0])))
    assert torch.equal(a, b)  # at init p0 = p1
    with torch.no_grad():
        norm.weight.p0.fill_(2.0)
    a, _ = norm(x, Conditioning(t=torch.tensor([-4.0, -4.0])))
    b, _ = norm(x, Conditioning(t=torch.tensor([4.0, 4.0])))
    assert (b.abs() > a.abs()).all()  # sigma(1) > sigma(-1): more weight on p0 = 2 at high noise


def test_no_weight_decay_lists_exactly_the_gates():
    model = torch.nn.Sequential(TimeDependentLayerNorm(4), torch.nn.Linear(4, 4), TimeDependentRMSNorm(4))
    assert no_weight_decay_names(model) == {"0.weight.w", "0.weight.b", "0.bias.w", "0.bias.b", "2.weight.w", "2.weight.b"}

