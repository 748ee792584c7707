"""The ConvNeXt block: DiMR's and the standard arrangement, against their definitions."""

from functools import partial

import pytest
import torch
import torch.nn.functional as F

from zoo.blocks.convnext import ConvNeXtBlock
from zoo.blocks.mlp import GeGluMlp, Mlp
from zoo.conditioning.base import Conditioning
from zoo.conditioning.layernorm import LayerNorm
from zoo.conditioning.time_dependent import TimeDependentRMSNorm

COND = Conditioning(t=torch.tensor([-1.0, 2.5]))


def _perturbed(block: torch.nn.Module) -> torch.nn.Module:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return block


def _dwconv(block: ConvNeXtBlock, x: torch.Tensor) -> torch.Tensor:
    """The depthwise conv the textbook way: NCHW-contiguous in and out."""
    y = F.conv2d(x.permute(0, 3, 1, 2).contiguous(), block.dwconv.weight, block.dwconv.bias, padding=3, groups=x.shape[-1])
    return y.permute(0, 2, 3, 1)


def test_dimr_variant_is_two_residuals_with_no_norm_before_the_conv():
    block = _perturbed(ConvNeXtBlock(16, kernel_size=7, mlp_ratio=2.0, norm=TimeDependentRMSNorm, mlp=GeGluMlp))
    x = torch.randn(2, 9, 9, 16)
    h = x + _dwconv(block, x)
    expected = h + block.mlp(block.norm(h, COND)[0])
    torch.testing.assert_close(block(x, COND), expected, rtol=0, atol=1e-5)
    assert block.mlp.fc1.out_features == 2 * 32  # GeGLU hidden = mlp_ratio * dim = 2C


def test_standard_variant_norms_after_the_conv_with_layer_scale():
    block = _perturbed(ConvNeXtBlock(8, norm=LayerNorm, mlp=Mlp, variant="standard", layer_scale_init=1e-6))
    x = torch.randn(2, 6, 6, 8)
    expected = x + block.layer_scale * block.mlp(block.norm(_dwconv(block, x))[0])
    torch.testing.assert_close(block(x, COND), expected, rtol=0, atol=1e-5)
    fresh = ConvNeXtBlock(8, variant="standard", layer_scale_init=1e-6)
    assert torch.equal(fresh.layer_scale, torch.full((8,), 1e-6))


def test_depthwise_conv_keeps_channels_last_without_copies():
    block = ConvNeXtBlock(8)
    x = torch.randn(2, 5, 7, 8)
    y = block.depthwise(x)
    assert y.shape == x.shape and y.is_contiguous()  # (B, H, W, C) contiguous = NCHW channels_last
    torch.testing.assert_close(y, _dwconv(block, x), rtol=0, atol=1e-6)


def test_parameter_count_of_dimr_block():
    C = 32
    block = ConvNeXtBlock(C, mlp_ratio=2.0, norm=TimeDependentRMSNorm, mlp=GeGluMlp)
    dw = 49 * C + C
    geglu = C * 4 * C + 4 * C + 2 * C * C + C
    assert sum(p.numel() for p in block.parameters()) == dw + 4 * C + geglu


def test_normed_conv_conditions_the_conv_branch_too():
    block = _perturbed(ConvNeXtBlock(8, norm=TimeDependentRMSNorm, mlp=partial(Mlp, act="gelu"), normed_conv=True))
    x = torch.randn(2, 5, 5, 8)
    h = x + _dwconv(block, block.conv_norm(x, COND)[0])
    expected = h + block.mlp(block.norm(h, COND)[0])
    torch.testing.assert_close(block(x, COND), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"variant": "convnext"}, "unknown ConvNeXt variant"), ({"kernel_size": 4}, "odd"),
     ({"variant": "standard", "normed_conv": True}, "normed_conv")],
)  # fmt: skip
def test_bad_options_are_explained(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ConvNeXtBlock(8, **kwargs)
