"""Objectives: Gaussian KL / decoder NLL, the DDPM posterior, iDDPM's hybrid loss, ε-MSE, label drop."""

import math
from pathlib import Path
from types import SimpleNamespace

import mpmath  # ships with torch (sympy dependency)
import pytest
import torch

from zoo.diffusion.discrete import DiscreteDiffusion, betas_from_schedule
from zoo.diffusion.gaussian import discretized_gaussian_log_likelihood, normal_kl
from zoo.diffusion.labels import drop_labels
from zoo.diffusion.objectives import DiffusionObjective, HybridVLBObjective, MultiScaleObjective
from zoo.diffusion.time_input import index_to_time
from zoo.solvers import build_schedule

GOLDEN = Path(__file__).parent / "golden"
N = 1000
BETAS = torch.linspace(1e-4, 0.02, N, dtype=torch.float64)
LINEAR = SimpleNamespace(betas=BETAS, discrete=True, num_steps=N)  # a discrete schedule as objectives read it


# ----------------------------------------------------------------------------- Gaussian terms


def test_normal_kl_matches_closed_form_and_integration():
    m1, lv1 = torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64), torch.tensor([-1.0, 0.5, -4.0], dtype=torch.float64)
    m2, lv2 = torch.tensor([0.0, -0.5, 2.1], dtype=torch.float64), torch.tensor([-0.5, 0.0, -3.0], dtype=torch.float64)
    ours = normal_kl(m1, lv1, m2, lv2)
    p = torch.distributions.Normal(m1, (0.5 * lv1).exp())
    q = torch.distributions.Normal(m2, (0.5 * lv2).exp())
    assert torch.allclose(ours, torch.distributions.kl_divergence(p, q), atol=1e-12)
    for i in range(3):  # ∫ p log(p/q) on a fine grid
        s = math.exp(0.5 * lv1[i].item())
        x = torch.linspace(m1[i].item() - 12 * s, m1[i].item() + 12 * s, 200_001, dtype=torch.float64)
        integrand = p.log_prob(x[:, None])[:, i].exp() * (p.log_prob(x[:, None])[:, i] - q.log_prob(x[:, None])[:, i])
        assert torch.trapezoid(integrand, x).item() == pytest.approx(ours[i].item(), rel=1e-6, abs=1e-9)
    assert normal_kl(m1, lv1, m1, lv1).abs().max() == 0


def _reference_log_likelihood(x: float, mean: float, log_scale: float) -> float:
    """log ∫ N(u; mean, s²) du over x's 8-bit bin (outer bins open), with 50-digit arithmetic."""
    mpmath.mp.dps = 50
    s = mpmath.exp(mpmath.mpf(log_scale))
    lo = -mpmath.inf if x < -0.999 else mpmath.mpf(x) - mpmath.mpf(1) / 255
    hi = mpmath.inf if x > 0.999 else mpmath.mpf(x) + mpmath.mpf(1) / 255
    if lo > mean:  # right tail: integrate the mirrored Gaussian so the CDFs are small, not near 1
        lo, hi = 2 * mpmath.mpf(mean) - hi, 2 * mpmath.mpf(mean) - lo
    return float(mpmath.log(mpmath.ncdf(hi, mean, s) - mpmath.ncdf(lo, mean, s)))


@pytest.mark.parametrize(
    "x, mean, log_scale",
    [
        (0.0, 0.01, -3.0),  # interior bin, narrow Gaussian
        (0.5, -0.2, -0.5),  # interior bin, wide Gaussian
        (-1.0, -0.9, -2.0),  # lowest bin: (-inf, -1 + 1/255]
        (1.0, 0.7, -1.5),  # highest bin: [1 - 1/255, inf)
        (0.8, -0.6, -3.5),  # far tail (naive difference of CDFs underflows to 0)
        (-0.8, 0.6, -3.5),  # far tail on the other side
        (2 / 255 - 1, -1.0, -6.0),  # second bin, very narrow Gaussian centred on the first
        # continuous values (DiT scores VAE latents) between 1 - 1/255 and iDDPM's/DiT's edge 0.999: an interior
        # bin there, as in the official code (zoo's edge had been 1 - 1/256 = 0.9961, an edge bin)
        (0.998, 0.998, -5.0),
        (-0.9975, -0.99, -4.0),
        (0.9995, 0.998, -5.0),  # past the edge: the open top bin
    ],
)
def test_discretized_gaussian_log_likelihood_matches_integral(x, mean, log_scale):
    ours = discretized_gaussian_log_likelihood(
        torch.tensor(x, dtype=torch.float64), torch.tensor(mean, dtype=torch.float64), torch.tensor(log_scale, dtype=torch.float64)
    ).item()
    assert ours == pytest.approx(_reference_log_likelihood(x, mean, log_scale), rel=1e-9, abs=1e-12)


def test_discretized_likelihood_sums_to_one_over_all_bins():
    values = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    for mean, log_scale in ((0.1, -1.0), (-0.95, -4.0), (0.999, 0.0)):
        ll = discretized_gaussian_log_likelihood(values, torch.tensor(mean, dtype=torch.float64), torch.tensor(log_scale, dtype=torch.float64))
        assert ll.exp().sum().item() == pytest.approx(1.0, abs=1e-12)


# ----------------------------------------------------------------------------- DDPM posterior


def test_posterior_matches_gaussian_conditioning():
    """q(x_{n-1} | x_n, x_0) from the joint: x_{n-1} ~ N(√ᾱ_{n-1}x0, 1-ᾱ_{n-1}), x_n = √α_n x_{n-1} + √β_n z."""
    d = DiscreteDiffusion(BETAS)
    x0, xt = torch.tensor([[0.7]], dtype=torch.float64), torch.tensor([[-0.4]], dtype=torch.float64)
    for n in (1, 10, 500, 999):
        abar_prev = torch.prod(1 - BETAS[:n])
        alpha = 1 - BETAS[n]
        var_prev = 1 - abar_prev
        cov = alpha.sqrt() * var_prev  # Cov(x_{n-1}, x_n | x0)
        var_t = alpha * var_prev + BETAS[n]
        mean_t = alpha.sqrt() * abar_prev.sqrt() * x0
        cond_mean = abar_prev.sqrt() * x0 + cov / var_t * (xt - mean_t)
        cond_var = var_prev - cov**2 / var_t
        mean, logvar = d.posterior(x0, xt, torch.tensor([n]))
        assert mean.item() == pytest.approx(cond_mean.item(), rel=1e-10)
        assert logvar.exp().item() == pytest.approx(cond_var.item(), rel=1e-10)
    _, logvar0 = d.posterior(x0, xt, torch.tensor([0]))
    assert logvar0.item() == pytest.approx(d.posterior_log_variance_clipped[1].item())  # β̃_0 = 0 is clipped


def test_model_variance_interpolates_between_beta_and_posterior_variance():
    d = DiscreteDiffusion(BETAS)
    n = torch.tensor([3, 700])
    v = torch.tensor([[1.0], [1.0]], dtype=torch.float64)
    assert torch.allclose(d.model_log_variance(v, n).flatten(), BETAS[n].log())
    assert torch.allclose(d.model_log_variance(-v, n).flatten(), d.posterior_variance[n].log())
    mid = d.model_log_variance(0 * v, n).flatten()
    assert torch.allclose(mid, 0.5 * (BETAS[n].log() + d.posterior_variance[n].log()))


def test_betas_recovered_from_marginals():
    abar = torch.cumprod(1 - BETAS, 0)
    knots = lambda t: abar[torch.round(t * N - 1).long()].sqrt()  # noqa: E731
    recovered = betas_from_schedule(SimpleNamespace(marginal_alpha=knots), N)
    assert torch.allclose(recovered, BETAS, rtol=1e-9)


# ----------------------------------------------------------------------------- hybrid loss


class Oracle(torch.nn.Module):
    """Outputs fixed tensors, recording its inputs; the objectives' noise comes from the test's generator."""

    def __init__(self, out_fn):
        super().__init__()
        self.out_fn = out_fn

    def forward(self, x, t, y=None):
        self.seen = (x, t, y)
        return self.out_fn(x, t)


def _true_eps(x0):
    """A model that knows x0 recovers ε exactly from x_t and its (DiT index) time input."""
    abar = torch.cumprod(1 - BETAS, 0)

    def fn(x, t):
        a = abar[t.round().long()].to(x.dtype).view(-1, 1, 1, 1)
        return (x - a.sqrt() * x0) / (1 - a).sqrt()

    return fn


def test_eps_mse_of_a_perfect_model_is_zero():
    x0 = torch.randn(6, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    obj = DiffusionObjective(LINEAR, "dit_index")
    out = obj(Oracle(_true_eps(x0)), x0, generator=torch.Generator().manual_seed(1))
    assert out["loss"].shape == (6,)
    assert out["loss"].max() < 1e-20
    wrong = obj(Oracle(lambda x, t: torch.zeros_like(x)), x0, generator=torch.Generator().manual_seed(1))
    assert wrong["loss"].mean() > 0.5  # = mean ε², about 1


def test_objectives_read_the_solvers_schedules():
    """The real ``linear`` schedule gives the same β table; the continuous VP-SDE uses its marginals at t."""
    obj = DiffusionObjective(build_schedule("linear", num_steps=N, beta_start=1e-4, beta_end=0.02), "dit_index")
    assert obj.num_steps == N and not obj.continuous
    assert torch.allclose(obj.discrete.betas, BETAS, rtol=1e-12)

    sched = build_schedule("vp_linear")
    obj = DiffusionObjective(sched, "uvit_continuous")
    x0 = torch.randn(8, 3, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def perfect(x, t_in):
        t = (t_in / 999).view(-1, 1, 1, 1)
        return (x - sched.marginal_alpha(t) * x0) / sched.marginal_std(t)

    model = Oracle(perfect)
    out = obj(model, x0, generator=torch.Generator().manual_seed(1))
    assert out["loss"].max() < 1e-20
    assert len(torch.unique(model.seen[1])) == 8 and 0 <= model.seen[1].min() and model.seen[1].max() <= 999
    with pytest.raises(ValueError, match="does not fit"):
        DiffusionObjective(sched, "dit_index")


def _hybrid_setup(index, v_value, eps_offset=0.0, **options):
    """x_0 on the 8-bit grid, the hybrid objective and the scored output of a model with given v."""
    g = torch.Generator().manual_seed(3)
    x0 = (torch.randint(0, 256, (len(index), 2, 4, 4), generator=g) / 127.5 - 1).double()
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    obj = HybridVLBObjective(LINEAR, "dit_index", **options)
    index = torch.tensor(index)
    x_t = obj.discrete.q_sample(x0, index, noise)
    v = torch.full_like(x0, v_value, requires_grad=True)
    eps = (noise + eps_offset).requires_grad_(True)
    terms = obj.loss_terms(torch.cat([eps, v], 1), x0=x0, x_t=x_t, noise=noise, t=index_to_time(index, N))
    return obj, terms, eps, v, x0


def test_hybrid_loss_of_a_perfect_model_is_minimal():
    """ε exact and Σ = β̃_n (v = −1): MSE = 0, KL = 0, and the gradient with respect to v vanishes."""
    _, terms, _, v, _ = _hybrid_setup([1, 50, 999], v_value=-1.0)
    assert terms["loss"].abs().max() < 1e-12
    (grad_v,) = torch.autograd.grad(terms["loss"].sum(), v)
    assert grad_v.abs().max() < 1e-8  # float64 rounding of the mean (Σ is ~1e-4 at n = 1)


@pytest.mark.parametrize("v_value", [-0.5, 0.0, 1.0])
def test_hybrid_kl_matches_variance_ratio_closed_form(v_value):
    """Same mean, Σ_model ≠ β̃: KL = ½(r − 1 − ln r) per dim with r = β̃/Σ_model, reported in bits."""
    obj, terms, _, _, _ = _hybrid_setup([10, 400], v_value=v_value)
    d = obj.discrete
    for row, n in enumerate((10, 400)):
        f = (v_value + 1) / 2
        var_model = math.exp(f * math.log(BETAS[n]) + (1 - f) * math.log(d.posterior_variance[n]))
        r = d.posterior_variance[n].item() / var_model
        expected = 0.5 * (r - 1 - math.log(r)) / math.log(2)
        assert terms["vlb"][row].item() == pytest.approx(expected, rel=1e-9)
        assert terms["vlb"][row].item() > 0


def test_hybrid_vlb_trains_only_the_variance():
    """The bound sees ε detached: a wrong ε raises the MSE and the KL, but ∂L_vlb/∂ε = 0."""
    _, terms, eps, v, _ = _hybrid_setup([5, 600], v_value=0.3, eps_offset=0.2)
    assert terms["mse"].min() == pytest.approx(0.04, rel=1e-9)
    (g_eps,) = torch.autograd.grad(terms["loss"].sum(), eps, retain_graph=True)
    expected_mse_grad = 2 * 0.2 / eps[0].numel()  # ∂ mean((ε - noise)²)/∂ε per element
    assert torch.allclose(g_eps, torch.full_like(g_eps, expected_mse_grad), rtol=1e-9)
    (g_v,) = torch.autograd.grad(terms["loss"].sum(), v)
    assert g_v.abs().min() > 0


def _dit_log_likelihood(x: float, mean: float, log_scale: float) -> float:
    """The official decoder term's per-value arithmetic (iDDPM/DiT), in float64: Φ by the tanh approximation
    0.5·(1 + tanh(√(2/π)·(z + 0.044715·z³))), each probability floored at 1e-12, edges at ±0.999."""
    def cdf(z: float) -> float:
        return 0.5 * (1.0 + math.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z ** 3)))

    inv = math.exp(-log_scale)
    plus, minus = cdf((x - mean + 1 / 255) * inv), cdf((x - mean - 1 / 255) * inv)
    if x < -0.999:
        return math.log(max(plus, 1e-12))
    if x > 0.999:
        return math.log(max(1.0 - minus, 1e-12))
    return math.log(max(plus - minus, 1e-12))


@pytest.mark.parametrize("decoder_cdf", ["tanh", "exact"])
@pytest.mark.parametrize("eps_offset", [0.0, 0.02])
def test_hybrid_decoder_term_at_step_zero(decoder_cdf, eps_offset):
    """At n = 0 the bound is the discretized decoder NLL −log p(x_0 | x_1) in bits/dim: DiT's arithmetic by default
    (the exact CDF scored a mean 0.02 off 16.8 nats per value worse than DiT, past its 1e-12 floor), or exact."""
    obj, terms, _, _, x0 = _hybrid_setup([0], v_value=0.0, eps_offset=eps_offset, decoder_cdf=decoder_cdf)
    logvar = 0.5 * (math.log(BETAS[0]) + obj.discrete.posterior_log_variance_clipped[0].item())
    # ε exact ⇒ x̂_0 = x_0, and the posterior mean at n = 0 is x̂_0 itself (c0 = 1, c1 = 0); an ε off by δ moves
    # x̂_0 by −δ·√(1−ᾱ_0)/√ᾱ_0
    shift = -eps_offset * math.sqrt(BETAS[0]) / math.sqrt(1 - BETAS[0])
    reference = _dit_log_likelihood if decoder_cdf == "tanh" else _reference_log_likelihood
    ll = [reference(x, x + shift, 0.5 * logvar) for x in x0.flatten().tolist()]
    assert terms["vlb"].item() == pytest.approx(-sum(ll) / len(ll) / math.log(2), rel=1e-6)


def test_hybrid_objective_end_to_end_with_a_model():
    x0 = (torch.randint(0, 256, (4, 2, 4, 4), generator=torch.Generator().manual_seed(0)) / 127.5 - 1).double()
    perfect = _true_eps(x0)
    model = Oracle(lambda x, t: torch.cat([perfect(x, t), -torch.ones_like(x)], 1))
    obj = HybridVLBObjective(LINEAR, "dit_index")
    out = obj(model, x0, generator=torch.Generator().manual_seed(5))
    t_in = model.seen[1]
    interior = t_in > 0
    assert torch.equal(t_in, t_in.round())
    assert out["loss"][interior].abs().max() < 1e-9
    with pytest.raises(ValueError, match="learned-sigma"):
        obj(Oracle(lambda x, t: x), x0)


# ----------------------------------------------------------------------------- multi-scale


def test_multiscale_objective_matches_official_loss_example():
    g = torch.load(GOLDEN / "golden_dimr_tiny_r2.pt", weights_only=True)
    ex = g["loss_example"]
    obj = MultiScaleObjective(LINEAR, "dimr_log_snr", coeffs=ex["loss_coeffs"])
    terms = obj.loss_terms(list(g["outputs"]), x0=None, x_t=None, noise=ex["eps"], t=None)
    assert torch.allclose(terms["loss"], ex["per_sample_loss"], atol=1e-5)
    with pytest.raises(ValueError, match="coefficients"):
        MultiScaleObjective(LINEAR, "dimr_log_snr", coeffs=[1.0]).loss_terms(
            list(g["outputs"]), x0=None, x_t=None, noise=ex["eps"], t=None
        )


# ----------------------------------------------------------------------------- labels


def test_drop_labels_is_vectorised_with_the_right_rate():
    y = torch.arange(100_000) % 1000
    out = drop_labels(y, 0.1, 1000, torch.Generator().manual_seed(0))
    dropped = out == 1000
    assert abs(dropped.float().mean().item() - 0.1) < 0.005
    assert torch.equal(out[~dropped], y[~dropped])
    assert torch.equal(y, torch.arange(100_000) % 1000)  # input untouched
    assert drop_labels(y, 0.0, 1000) is y
    assert (drop_labels(y, 1.0, 1000) == 1000).all()
    again = drop_labels(y, 0.1, 1000, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_objective_drops_labels_before_the_model():
    x0 = torch.zeros(4000, 1, 1, 1)
    model = Oracle(lambda x, t: x)
    obj = DiffusionObjective(LINEAR, "uvit_discrete", label_drop=0.25, null_label=7)
    obj(model, x0, torch.zeros(4000, dtype=torch.long), generator=torch.Generator().manual_seed(0))
    y_seen, t_seen = model.seen[2], model.seen[1]
    assert abs((y_seen == 7).float().mean().item() - 0.25) < 0.03
    assert t_seen.min() >= 1 and t_seen.max() <= N  # U-ViT's 1-based steps
    with pytest.raises(ValueError, match="null"):
        DiffusionObjective(LINEAR, "uvit_discrete", label_drop=0.1)


def test_given_draws_drop_exactly_the_labels_whose_uniform_is_below_label_drop():
    """The trainer's path (``draws = (t, noise, u)``): sample i is unconditional iff u_i < label_drop."""
    n = 4000
    x0 = torch.zeros(n, 1, 1, 1)
    model = Oracle(lambda x, t: x)
    obj = DiffusionObjective(LINEAR, "uvit_discrete", label_drop=0.25, null_label=7)
    u = torch.linspace(0, 1, n, dtype=torch.float64)
    t = index_to_time(torch.randint(0, N, (n,), generator=torch.Generator().manual_seed(0)), N)
    obj(model, x0, torch.zeros(n, dtype=torch.long), draws=(t, torch.zeros(x0.shape), u))
    assert torch.equal(model.seen[2] == 7, u < 0.25)


# ----------------------------------------------------------------------------- Min-SNR-γ weighting


@pytest.mark.parametrize("objective", ["eps_mse", "multiscale"])
def test_min_snr_weight_is_min_snr_gamma_on_the_x0_error_for_eps_and_v(objective):
    """Hang et al. 2023: the loss is min(SNR, γ)·mean((x̂_0 − x_0)²) whichever quantity the model predicts;
    ``mse`` stays the unweighted error of the prediction."""
    g = torch.Generator().manual_seed(0)
    index = torch.tensor([0, 10, 100, 300, 500, 800, 999])
    x0 = torch.randn(7, 2, 4, 4, generator=g, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    x0_hat = x0 + 0.1 * torch.randn(x0.shape, generator=g, dtype=torch.float64)  # a model's x_0 guess
    abar = torch.cumprod(1 - BETAS, 0)[index].view(-1, 1, 1, 1)
    alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    x_t = alpha * x0 + sigma * noise
    snr = (abar / (1 - abar)).flatten()
    expected = snr.clamp(max=5.0) * (x0_hat - x0).pow(2).flatten(1).mean(1)
    outputs = {"eps": (x_t - alpha * x0_hat) / sigma, "v": alpha * (x_t - alpha * x0_hat) / sigma - sigma * x0_hat}
    for prediction, out in outputs.items():
        extra = {"coeffs": [1.0]} if objective == "multiscale" else {}
        cls = MultiScaleObjective if objective == "multiscale" else DiffusionObjective
        obj = cls(LINEAR, "dit_index", prediction=prediction, min_snr_gamma=5.0, **extra)
        plain = cls(LINEAR, "dit_index", prediction=prediction, **extra)
        kw = dict(x0=x0, x_t=x_t, noise=noise, t=index_to_time(index, N))
        out = [out] if objective == "multiscale" else out
        terms, unweighted = obj.loss_terms(out, **kw), plain.loss_terms(out, **kw)
        assert torch.allclose(terms["loss"], expected, rtol=1e-10, atol=0), prediction
        assert torch.equal(terms["mse"], unweighted["mse"]) and torch.equal(unweighted["loss"], unweighted["mse"])
        assert not torch.allclose(unweighted["loss"], expected)  # the weighting changes the loss


def test_min_snr_gamma_must_be_positive_in_a_recipe():
    import zoo
    from zoo.errors import UserError

    for bad in ("0", "-1.0", "fast"):
        with pytest.raises(UserError, match="min_snr_gamma must be a (positive )?number"):
            zoo.load_recipe(Path(__file__).parent / "recipes" / "tiny_train.yaml", [f"diffusion.min_snr_gamma={bad}"])
    recipe = zoo.load_recipe(Path(__file__).parent / "recipes" / "tiny_train.yaml", ["diffusion.min_snr_gamma=5"])
    from zoo.diffusion.setup import build_objective

    assert build_objective(recipe).min_snr_gamma == 5.0
    with pytest.raises(ValueError, match="min_snr_gamma"):
        DiffusionObjective(LINEAR, "dit_index", min_snr_gamma=0.0)
