"""Pins on :mod:`zoo.meta` that mutation testing (round 11b) found unheld: :class:`~zoo.meta.MetaShapeCache`
hands back the strides the meta kernel gives (its key holds the input strides: without them a transposed
input got the cached contiguous output of an earlier call on the same shape), and :class:`RepeatedBlockMemo`
tells repeated blocks apart by their keyword arguments and by the shapes of their parameters (a plugin block
called as ``blk(x, ctx=c)``, or one whose widths live only in its parameters' shapes)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from zoo.flops import count_flops
from zoo.meta import MetaShapeCache, build_on_meta, no_dynamo_import

pytestmark = pytest.mark.usefixtures("one_thread")


def test_meta_shape_cache_gives_an_input_of_other_strides_the_kernels_strides():
    """Same shape, other strides, same op: the kernel keeps a transposed input's layout ((1, 6) here).
    A cache keyed on shapes alone returned the first call's contiguous (4, 1): a later ``view`` or
    channels-last check then sees a layout the real model never has."""
    with no_dynamo_import():  # as zoo counts FLOPs: meta kernels without the 1-3 s Dynamo import
        a = torch.empty(6, 4, device="meta")
        b = torch.empty(4, 6, device="meta").t()
        expected = [(a + 1).stride(), (b + 1).stride()]
        with MetaShapeCache() as cache:
            got = [(a + 1).stride(), (b + 1).stride(), (a + 1).stride(), (b + 1).stride()]
    assert expected == [(4, 1), (1, 6)]
    assert got == expected * 2
    assert cache.cache  # it did cache (the repeats above came from it)


class _CtxBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4, bias=False)

    def forward(self, x, ctx=None):
        return self.lin(x) + torch.bmm(ctx, ctx.transpose(1, 2)).mean()  # B·n·n·4 MACs: n from the keyword


class _CtxModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([_CtxBlock(), _CtxBlock()])

    def forward(self, x, c1, c2):
        return self.blocks[1](self.blocks[0](x, ctx=c1), ctx=c2)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_repeated_block_memo_keys_on_keyword_arguments(device):
    """Two identical blocks on the same ``x`` but keyword inputs of 2 and 8 tokens: 16 + 16 and 16 + 256 MACs.
    A memo keyed on positional arguments alone ran the first block only and gave the second its 32 MACs
    (64 in all instead of 304), on meta only, so ``zoo build --flops`` disagreed with the count on cpu."""
    model = build_on_meta(_CtxModel) if device == "meta" else _CtxModel()
    inputs = tuple(torch.randn(*shape, device=device) for shape in [(1, 4), (1, 2, 4), (1, 8, 4)])
    report = count_flops(model, inputs, max_depth=2)
    assert report.gflops * 1e9 == pytest.approx(2 * 16 + 16 + 256, abs=1e-6)
    assert report.by_module["blocks.0"] * 1e9 == pytest.approx(16 + 16, abs=1e-6)
    assert report.by_module["blocks.1"] * 1e9 == pytest.approx(16 + 256, abs=1e-6)


class _Proj(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.w = nn.Parameter(torch.ones(4, width))  # the width is in the parameter's shape alone

    def forward(self, x):
        return x @ self.w


class _Heads(nn.Module):
    def __init__(self):
        super().__init__()
        self.heads = nn.ModuleList([_Proj(2), _Proj(8)])

    def forward(self, x):
        return sum(h(x).sum() for h in self.heads)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_repeated_block_memo_tells_blocks_apart_by_parameter_shapes(device):
    """Same class, same settings, same input, parameters (4, 2) and (4, 8): 8 + 32 MACs. A memo whose block
    key left out parameter shapes took the second for a repeat of the first (8 + 8 on meta, 40 on cpu)."""
    model = build_on_meta(_Heads) if device == "meta" else _Heads()
    report = count_flops(model, (torch.randn(1, 4, device=device),), max_depth=2)
    assert report.gflops * 1e9 == pytest.approx(8 + 32, abs=1e-6)
    assert report.by_module["heads.1"] * 1e9 == pytest.approx(32, abs=1e-6)
