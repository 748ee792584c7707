"""Backbones under ``torch.func``: per-sample gradients and ``vmap`` give what plain autograd and the
batched forward give. DiMR's fused RMS norm and GeGLU (autograd Functions without a functorch rule)
refused ``torch.func.grad``, and the label range check (``int(y.max())``) and DiMR's channels-last
calls refused ``vmap``."""

from pathlib import Path

import pytest
import torch

import zoo

RECIPES = Path(__file__).parent / "recipes"


def _perturbed(name: str) -> torch.nn.Module:
    """A float64 model with every weight moved off its init (a fresh DiT's adaLN-Zero outputs zeros)."""
    torch.manual_seed(0)
    model = zoo.build_model(RECIPES / name).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def _final(out):
    return out[-1] if isinstance(out, list) else out  # DiMR: the finest branch's output


@pytest.mark.parametrize("name", ["tiny_dimr_pixels.yaml", "tiny_dit_pixels.yaml"])
@pytest.mark.filterwarnings("ignore:There is a performance drop")  # vmap of CPU attention: a loop in torch
def test_func_grad_and_vmap_match_autograd_and_the_batched_forward(name):
    model = _perturbed(name)
    x = torch.randn(3, *model.example_inputs(1)[0].shape[1:], dtype=torch.float64)
    t, y = torch.tensor([10.0, 500.0, 900.0], dtype=torch.float64), torch.tensor([0, 1, 2])
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p):
        return _final(torch.func.functional_call(model, p, (x, t, y))).pow(2).mean()

    grads = torch.func.grad(loss)(params)
    loss(dict(model.named_parameters())).backward()
    for key, param in model.named_parameters():
        if param.requires_grad:  # (DiT's frozen sin-cos table has no .grad; func.grad gives it one)
            # float64: both are the same sums in another order, ~1e-16 relative
            expected = torch.zeros_like(param) if param.grad is None else param.grad  # (a part the output skips)
            torch.testing.assert_close(grads[key], expected, rtol=1e-10, atol=1e-14, msg=key)
    per_sample = torch.func.vmap(lambda a, tt, yy: _final(model(a[None], tt[None], yy[None]))[0])(x, t, y)
    with torch.no_grad():
        torch.testing.assert_close(per_sample, _final(model(x, t, y)), rtol=1e-10, atol=1e-12)


def test_labels_out_of_range_are_still_refused_outside_transforms():
    model = _perturbed("tiny_dit_pixels.yaml")
    x, t, _ = model.example_inputs(1)
    with pytest.raises(zoo.errors.UserError, match="out of range"):
        model(x.double(), t.double(), torch.tensor([model.num_labels]))
