"""The error budgets of tests/numerics.py cover what another CPU does, and are not vacuous."""

from __future__ import annotations

import pytest
import torch
from numerics import U32, propagated_bound, shift_sinusoid_arguments, sinusoid_bound

from zoo.backbones.dit import DiT
from zoo.conditioning.embeddings import timestep_sinusoid

T = torch.tensor([0.0, 1.0, 10.5, 250.0, 500.0, 777.25, 999.0])


@pytest.mark.parametrize("ulps", [1, -1, 2, -2])
def test_sinusoid_bound_covers_arguments_ulps_away(ulps: int):
    """Another CPU's exp and product rounding move ``t f`` by up to ~2 ulps: still within the bound."""
    ours = timestep_sinusoid(T, 256)
    with shift_sinusoid_arguments(ulps):
        other = timestep_sinusoid(T, 256)
    diff = (other - ours).abs()
    assert (diff <= sinusoid_bound(T, 256)).all()
    assert diff[-1].max() > 1e-5  # what a fixed atol of 1e-6 (the old tests) could not absorb
    assert torch.equal(other[0], ours[0])  # t = 0: cos 0 = 1, sin 0 = 0 on any CPU


def test_sinusoid_bound_values():
    bound = sinusoid_bound(torch.tensor([0.0, 999.0]), 7)
    assert bound[0, :6].tolist() == [8 * U32] * 6 and bound[:, 6].tolist() == [0, 0]  # pad column is exact
    assert bound[1, 0].item() == pytest.approx(U32 * (6 * 999 + 8))  # f_0 = 1


def test_propagated_bound_covers_the_model_output_of_shifted_features():
    """Carried through a float64 DiT, the budget covers what a one-ulp shift of every argument does."""
    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=10)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))  # adaLN-Zero starts at zero: give time a path to the output
    model = model.double().eval()
    x, t, y = torch.randn(1, 4, 8, 8, dtype=torch.float64), torch.tensor([999]), torch.tensor([1])
    (bound,) = propagated_bound(model, (x, t, y), timestep_sinusoid(t, 256), sinusoid_bound(t, 256))
    with torch.no_grad():
        out = model(x, t, y)
        for ulps in (1, -1):
            with shift_sinusoid_arguments(ulps):
                moved = (model(x, t, y) - out).abs()
            assert (moved <= bound).all()
            assert moved.max() > 1e-7  # the shift does reach the output
    assert bound.max() < 1e-2  # and the budget stays small against outputs of size ~1



def test_sinusoid_frequency_table_is_cached_bit_identically_and_never_as_a_fake_tensor():
    """timestep_sinusoid built its frequency table (3 ops) every call; it is built once per (size, period, device),
    with the same bits, and afresh under a dispatch mode (a FakeTensorMode's tensor must not stay in the cache)
    and while Dynamo compiles."""
    import math

    import torch.nn.functional as F
    from torch._subclasses.fake_tensor import FakeTensorMode

    from zoo.conditioning.embeddings import _cached_frequency_table

    def formula(t, dim, max_period=10000.0):
        t = torch.as_tensor(t).reshape(-1).float()
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
        angles = t[:, None] * freqs[None]
        return F.pad(torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1), (0, dim % 2))

    t = torch.tensor([0, 1, 17, 999])
    for dim, period in ((256, 10000.0), (257, 10000.0), (384, 1000)):
        for times in (t, t.double() / 7):
            hits = _cached_frequency_table.cache_info().hits
            assert torch.equal(timestep_sinusoid(times, dim, period), formula(times, dim, period))
        assert _cached_frequency_table.cache_info().hits == hits + 1  # the second call found the table
    with torch.inference_mode():
        timestep_sinusoid(t, 250)
    assert not _cached_frequency_table(125, 10000.0, torch.device("cpu")).is_inference()  # usable outside it
    assert timestep_sinusoid(t.to("meta"), 256).shape == (4, 256)
    size = _cached_frequency_table.cache_info().currsize
    with FakeTensorMode():
        timestep_sinusoid(torch.zeros(4), 62)
    assert _cached_frequency_table.cache_info().currsize == size
    compiled = torch.compile(lambda x: timestep_sinusoid(x, 66), backend="eager", fullgraph=True)
    assert torch.equal(compiled(t.float()), formula(t, 66))
