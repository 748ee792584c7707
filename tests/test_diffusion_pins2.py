"""Pins on the training objectives and the diffusion/sample sections that a sixth round of mutation testing
could change unseen: the hybrid loss's vlb_weight and Min-SNR weight, its loss_is_mse, the float32 floor of
loss arithmetic, the label-drop boundary u == label_drop, the guidance convention a recipe leaves out, and
a model whose own class dropout is off beside diffusion.label_drop."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import zoo
from zoo.diffusion.objectives import DiffusionObjective, HybridVLBObjective
from zoo.diffusion.time_input import index_to_time

pytestmark = pytest.mark.usefixtures("one_thread")

RECIPES = Path(__file__).parent / "recipes"
N = 1000
LINEAR = SimpleNamespace(betas=torch.linspace(1e-4, 0.02, N, dtype=torch.float64), discrete=True, num_steps=N)


def _hybrid_terms(**options):
    """The hybrid objective's terms for a fixed float64 [eps | v] output at interior and edge steps."""
    g = torch.Generator().manual_seed(0)
    index = torch.tensor([0, 7, 300, 999])
    x0 = torch.rand(4, 2, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    obj = HybridVLBObjective(LINEAR, "dit_index", **options)
    x_t = obj.discrete.q_sample(x0, index, noise)
    eps = noise + 0.1 * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    v = torch.rand(x0.shape, generator=g, dtype=torch.float64) * 2 - 1
    out = torch.cat([eps, v], 1)
    return obj, obj.loss_terms(out, x0=x0, x_t=x_t, noise=noise, t=index_to_time(index, N))


def test_the_hybrid_loss_scales_its_bound_by_vlb_weight():
    """loss = L_simple + vlb_weight * L_vlb: dropping the weight trained every run with weight 1."""
    _, terms = _hybrid_terms(vlb_weight=0.25)
    torch.testing.assert_close(terms["loss"], terms["mse"] + 0.25 * terms["vlb"], rtol=1e-12, atol=0)
    _, zero = _hybrid_terms(vlb_weight=0.0)
    torch.testing.assert_close(zero["loss"], zero["mse"], rtol=1e-12, atol=0)
    assert (terms["vlb"] > 0).all()


def test_the_hybrid_loss_weights_its_mse_by_min_snr():
    """With min_snr_gamma the L_simple term carries min(SNR, gamma)/SNR (the bound does not): an unweighted mse
    silently ignored the recipe's min_snr_gamma for learned-sigma models."""
    obj, terms = _hybrid_terms(min_snr_gamma=5.0)
    t = index_to_time(torch.tensor([0, 7, 300, 999]), N)
    abar = torch.cumprod(1 - LINEAR.betas, 0)[torch.tensor([0, 7, 300, 999])]
    snr = abar / (1 - abar)
    weight = snr.clamp(max=5.0) / snr
    assert weight.min() < 0.01 and weight.max() == 1.0  # capped at small t, 1 at large t
    torch.testing.assert_close(obj.loss_weight(t, terms["mse"]), weight, rtol=1e-12, atol=0)
    torch.testing.assert_close(terms["loss"], terms["mse"] * weight + terms["vlb"], rtol=1e-12, atol=0)


def test_the_hybrid_loss_is_never_its_mse_alone():
    """The trainer logs mse beside the loss only where loss_is_mse is False: the hybrid loss adds L_vlb even
    without a Min-SNR weight, so its mse must be logged."""
    assert HybridVLBObjective(LINEAR, "dit_index").loss_is_mse is False
    assert DiffusionObjective(LINEAR, "dit_index").loss_is_mse is True


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_output_is_scored_in_float32(dtype):
    """A bf16/fp16 model output is upcast before the squared error: kept in its own dtype, the loss rounded to
    8 (bf16) or 11 (fp16) bits and the target was cast down to it."""
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(2, 3, 4, 4, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    out = (noise + 0.01 * torch.randn(x0.shape, generator=g)).to(dtype)
    obj = DiffusionObjective(LINEAR, "dit_index")
    t = index_to_time(torch.tensor([5, 500]), N)
    terms = obj.loss_terms(out, x0=x0, x_t=x0, noise=noise, t=t)
    assert terms["loss"].dtype == torch.float32
    expected = (out.double() - noise.double()).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(terms["loss"].double(), expected, rtol=1e-5, atol=0)
    double = obj.loss_terms(out.double(), x0=x0.double(), x_t=x0.double(), noise=noise.double(), t=t)
    assert double["loss"].dtype == torch.float64  # float64 stays float64


def test_a_label_is_dropped_only_when_its_uniform_is_strictly_below_label_drop():
    """P(drop) = label_drop exactly needs u < p for u ~ U[0, 1), as drop_labels does: u == p keeps the label
    (u <= p dropped it, and the trainer's draws then disagreed with drop_labels at the boundary)."""

    class Seen(torch.nn.Module):
        def forward(self, x, t, y=None):
            self.y = y
            return x

    model = Seen()
    obj = DiffusionObjective(LINEAR, "dit_index", label_drop=0.25, null_label=9)
    u = torch.tensor([0.0, 0.24999, 0.25, 0.5])
    t = index_to_time(torch.tensor([1, 2, 3, 4]), N)
    x0 = torch.zeros(4, 1, 2, 2)
    obj(model, x0, torch.zeros(4, dtype=torch.long), draws=(t, torch.zeros(x0.shape), u))
    assert model.y.tolist() == [9, 9, 0, 0]


def test_guidance_without_a_stated_convention_is_dits():
    """sample.cfg: {scale: 1.5} alone is DiT's w = 1.5 (GuidanceSettings' default convention): reading it as
    U-ViT's s = 1.5 guided with w = 2.5."""
    from zoo.diffusion.setup import guidance_settings

    recipe = zoo.load_recipe(RECIPES / "tiny_train.yaml", ["sample.cfg.scale=1.5"])
    assert "convention" not in recipe["sample"]["cfg"]
    settings = guidance_settings(recipe)
    assert settings.convention == "dit" and settings.w == 1.5
    assert guidance_settings({}).convention == "dit"


def test_a_model_with_its_own_class_dropout_off_takes_any_label_drop():
    """class_dropout_prob 0 is the model's dropout off, the setup zoo train uses: only a positive one must equal
    diffusion.label_drop (a nonzero disagreement is still refused)."""
    recipe = zoo.load_recipe(RECIPES / "tiny_train.yaml", ["model.class_dropout_prob=0", "diffusion.label_drop=0.2"])
    assert recipe["diffusion"]["label_drop"] == 0.2 and recipe["model"]["class_dropout_prob"] == 0
    with pytest.raises(zoo.errors.UserError, match="class_dropout_prob=0.1 but diffusion.label_drop is 0.2"):
        zoo.load_recipe(RECIPES / "tiny_train.yaml", ["diffusion.label_drop=0.2"])


@pytest.mark.parametrize("schedule", [{"type": "cosine_discrete", "num_steps": 1000},
                                      {"type": "linear", "num_steps": 1000, "beta_start": 1e-4, "beta_end": 0.02}])
def test_fp32_noise_levels_are_the_float64_values_rounded_once(schedule):
    """σ_n = √(1 − ᾱ_n) taken after ᾱ was cast to fp32 cancelled at the first steps (2.6e-4 relative at n = 0
    under iDDPM's cosine table, 8e-5 under the linear one; the Min-SNR weight 5e-4 off). iDDPM keeps √ᾱ,
    √(1 − ᾱ), √(1/ᾱ) and √(1/ᾱ − 1) as float64 tables and casts the gathered values: one rounding each."""
    from zoo.diffusion.setup import build_objective

    obj = build_objective({"diffusion": {"schedule": schedule, "objective": "eps_mse", "time_input": "dit_index"}})
    d, index = obj.discrete, torch.arange(5)
    t = (index.double() + 1) / 1000
    like = torch.zeros(5, 3, 2, 2)
    abar = d.alphas_cumprod[index]
    alpha, sigma = obj.coefficients(t, like)
    assert alpha.dtype == sigma.dtype == torch.float32
    assert torch.equal(sigma.flatten(), (1 - abar).sqrt().float())  # rounded once, from float64
    assert torch.equal(alpha.flatten(), abar.sqrt().float())
    x0, eps = torch.randn(5, 3, 2, 2, dtype=torch.float64), torch.randn(5, 3, 2, 2, dtype=torch.float64)
    x_t = d.q_sample(x0.float(), index, eps.float()).double()
    exact = abar.sqrt().view(-1, 1, 1, 1) * x0 + (1 - abar).sqrt().view(-1, 1, 1, 1) * eps
    assert (x_t - exact).abs().max() < 4 * 2**-24 * exact.abs().max()  # fp32 rounding of the inputs and 2 products
    back = d.predict_x0(x_t.float(), index, eps.float()).double()
    # x0 = √(1/ᾱ)·x_t − √(1/ᾱ − 1)·ε from float64 tables: against that formula in float64 on the same fp32 inputs,
    # fp32 rounding of the two coefficients, two products and a difference, 4 ulps of the terms' size at most. The
    # fp32 (x_t − √(1 − ᾱ)·ε)/√ᾱ of an fp32 ᾱ errs ~1.4e-6 here, above that bound (~8e-7).
    c1, c2 = (1 / abar).sqrt().view(-1, 1, 1, 1), (1 / abar - 1).sqrt().view(-1, 1, 1, 1)
    ref = c1 * x_t - c2 * eps.float().double()
    assert (back - ref).abs().max() < 4 * 2**-24 * (c1 * x_t.abs() + c2 * eps.float().double().abs()).max()
    assert torch.allclose(back, x0, rtol=0, atol=1e-4)
