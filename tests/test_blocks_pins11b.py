"""Pins on the blocks that mutation testing (round 11b) found unheld: ``Attention`` refuses a width its
heads do not divide when it is built (a block used on its own, outside a recipe's ``Divisible`` check), and
the registered ``mlp`` factory's defaults when a plugin block calls it with the width alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from zoo.blocks.attention import Attention
from zoo.blocks.mlp import Mlp

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("dim, heads", [(10, 3), (12, 5)])
def test_attention_refuses_a_width_its_heads_do_not_divide_when_built(dim, heads):
    """Without the check the module built, and its first forward failed in ``view`` with "shape '[1, 2, 3, 3, 3]'
    is invalid for input of size 60": no word of heads or width, and only once data reached it."""
    with pytest.raises(ValueError, match=rf"attention width {dim} is not divisible by num_heads={heads}"):
        Attention(dim, heads)
    Attention(12, 3)(torch.randn(1, 2, 12))  # a width the heads divide builds and runs


def test_mlp_defaults_to_four_times_the_width_and_exact_gelu():
    """``Mlp(dim)`` is the ViT/DiT MLP: hidden 4·dim (GeGluMlp's 2·dim is pinned elsewhere) and the erf GELU.
    A default of 2·dim halved a plugin block's MLP (and its parameters and FLOPs) without a word."""
    torch.manual_seed(0)
    mlp = Mlp(8).double()
    assert (mlp.fc1.in_features, mlp.fc1.out_features, mlp.fc2.in_features, mlp.fc2.out_features) == (8, 32, 32, 8)
    assert sum(p.numel() for p in mlp.parameters()) == 8 * 32 + 32 + 32 * 8 + 8
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    expected = F.linear(F.gelu(F.linear(x, mlp.fc1.weight, mlp.fc1.bias)), mlp.fc2.weight, mlp.fc2.bias)
    torch.testing.assert_close(mlp(x), expected, rtol=1e-12, atol=1e-12)
