"""Pins on backbone options off the golden path that no other test held (mutation round 8b).

DiT's ``set_grad_checkpointing`` must really recompute the blocks in backward: every other test of
it compared gradients only, which a switch that silently does nothing also passes, and a researcher
who turns it on to fit a batch would only see the memory not drop. And two contracts of
conditioning/base.py: a time of ``B`` values in a shape other than ``(B,)``/``(B, 1)`` is refused (a
(2, 2) grid of times for a batch of 4 was silently flattened), and a model with no declared
conditioner is not called time-blind (the refusal is for plain norms everywhere, not for plugin
blocks that read t their own way).
"""

from __future__ import annotations

import pytest
import torch

from torch import nn

from zoo.backbones.dit import DiT
from zoo.conditioning.base import as_time_vector, time_blind
from zoo.conditioning.layernorm import LayerNorm
from zoo.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")

_DIT = dict(input_size=4, patch_size=2, in_channels=3, hidden_size=16, depth=2, num_heads=2, num_classes=5)


def _block_calls(model: torch.nn.Module, blocks, grad: bool = True) -> list[int]:
    """Forward calls of each block over one forward (+ backward where ``grad``)."""
    calls = [0] * len(blocks)
    hooks = [b.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1)) for i, b in enumerate(blocks)]
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
        with torch.set_grad_enabled(grad):
            out = model(x, torch.tensor([3, 700]), torch.tensor([0, 4]))
            if grad:
                out.square().sum().backward()
    finally:
        for h in hooks:
            h.remove()
    return calls


def test_dit_grad_checkpointing_recomputes_every_block_in_backward():
    """A switch that only set the flag ran each block once: same gradients, none of the memory saved."""
    torch.manual_seed(0)
    model = DiT(**_DIT).double()
    assert _block_calls(model, model.blocks) == [1, 1]
    model.set_grad_checkpointing(True)
    assert model.grad_checkpointing
    assert _block_calls(model, model.blocks) == [2, 2]  # forward, then the recomputation in backward
    assert _block_calls(model, model.blocks, grad=False) == [1, 1]  # nothing to recompute without autograd
    model.set_grad_checkpointing(False)
    assert _block_calls(model, model.blocks) == [1, 1]


def test_b_times_in_a_shape_other_than_b_or_b_by_1_are_refused():
    """Checked on the element count alone, a (2, 2) tensor of times for a batch of 4 was flattened in
    raster order and each sample silently got some other sample's noise level."""
    with pytest.raises(UserError, match=r"got shape \(2, 2\)"):
        as_time_vector(torch.zeros(2, 2), 4, torch.device("cpu"))
    t = torch.arange(4.0, dtype=torch.float64)
    assert torch.equal(as_time_vector(t[:, None], 4, torch.device("cpu")), t)  # (B, 1) is one per sample
    assert as_time_vector(torch.tensor([[0.5]]), 3, torch.device("cpu")).tolist() == [0.5] * 3


def test_a_module_without_declared_conditioners_is_not_time_blind():
    """The refusal needs some conditioner that declares ignoring time: a module with none (a plugin
    block reading t its own way) was refused as time-blind by an all() over nothing."""
    assert not time_blind(nn.Sequential(nn.Linear(2, 2)))
    assert time_blind(nn.Sequential(LayerNorm(4)), LayerNorm)  # plain norms only: blind
