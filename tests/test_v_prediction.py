"""v-prediction (``diffusion.prediction: v``): the training target, the multi-scale target, and the
sampler's conversion back to ε, checked in float64 against models that know the answer."""

from pathlib import Path

import pytest
import torch

from zoo.diffusion.guidance import GuidedModel
from zoo.diffusion.multiscale import multiscale_target
from zoo.diffusion.objectives import DiffusionObjective, HybridVLBObjective, MultiScaleObjective
from zoo.diffusion.setup import build_objective, guided_eps_fn, guidance_settings
from zoo.solvers import build_schedule
from zoo.solvers.oracles import GaussianOracle

N = 1000
SCHEDULE = build_schedule("linear", num_steps=N, beta_start=1e-4, beta_end=0.02)
ABAR = torch.cumprod(1 - torch.linspace(1e-4, 0.02, N, dtype=torch.float64), 0)


class Oracle(torch.nn.Module):
    def __init__(self, out_fn):
        super().__init__()
        self.out_fn = out_fn

    def forward(self, x, t, y=None):
        return self.out_fn(x, t)


def _true_v(x0):
    """v = α·ε − σ·x_0 of x_t, from x_0 and the DiT index time input (ε recovered from x_t)."""

    def fn(x, t):
        a = ABAR[t.round().long()].to(x.dtype).view(-1, 1, 1, 1)
        alpha, sigma = a.sqrt(), (1 - a).sqrt()
        eps = (x - alpha * x0) / sigma
        return alpha * eps - sigma * x0

    return fn


def test_v_objective_of_a_perfect_v_model_is_zero_and_eps_output_is_wrong():
    x0 = torch.randn(6, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    obj = DiffusionObjective(SCHEDULE, "dit_index", prediction="v")
    out = obj(Oracle(_true_v(x0)), x0, generator=torch.Generator().manual_seed(1))
    assert out["loss"].shape == (6,) and out["loss"].max() < 1e-20
    eps_obj = DiffusionObjective(SCHEDULE, "dit_index")  # the same v model scored as an ε model is wrong
    assert eps_obj(Oracle(_true_v(x0)), x0, generator=torch.Generator().manual_seed(1))["loss"].mean() > 1e-3


def test_v_target_is_alpha_eps_minus_sigma_x0_for_continuous_schedules_too():
    vp = build_schedule("vp_linear")
    obj = DiffusionObjective(vp, "uvit_continuous", prediction="v")
    x0, eps = torch.randn(2, 5, 3, 3, dtype=torch.float64).unbind(0)
    t = torch.tensor([0.01, 0.2, 0.5, 0.9, 1.0], dtype=torch.float64)
    alpha, sigma = vp.marginal_alpha(t).view(-1, 1, 1), vp.marginal_std(t).view(-1, 1, 1)
    assert torch.allclose(obj.target(x0, eps, t), alpha * eps - sigma * x0, atol=1e-14, rtol=0)
    x_t = obj.add_noise(x0, t, eps)
    assert torch.allclose(sigma * x_t + alpha * obj.target(x0, eps, t), eps, atol=1e-13, rtol=0)


def test_multiscale_v_targets_pool_v_like_dimr_pools_eps():
    x0 = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    full = _true_v(x0)

    def two_branches(x, t):
        v = full(x, t)
        return [multiscale_target(v, 4), v]

    obj = MultiScaleObjective(SCHEDULE, "dit_index", coeffs=[0.25, 1.0], prediction="v")
    assert obj(Oracle(two_branches), x0, generator=torch.Generator().manual_seed(3))["loss"].max() < 1e-20
    half_wrong = lambda x, t: [torch.zeros(x.shape[0], 3, 4, 4, dtype=x.dtype), full(x, t)]  # noqa: E731
    assert obj(Oracle(half_wrong), x0, generator=torch.Generator().manual_seed(3))["loss"].min() > 1e-3


def test_hybrid_objective_refuses_v():
    with pytest.raises(ValueError, match="ε prediction only"):
        HybridVLBObjective(SCHEDULE, "dit_index", prediction="v")
    with pytest.raises(ValueError, match="prediction must be"):
        DiffusionObjective(SCHEDULE, "dit_index", prediction="x0")


def _gaussian_models(d: int = 6):
    """Exact ε of two Gaussians (class 1 and the null label 0) and the v models that go with them."""
    g = torch.Generator().manual_seed(4)
    oracles = [GaussianOracle(SCHEDULE, torch.randn(d, generator=g, dtype=torch.float64),
                              0.2 + torch.rand(d, generator=g, dtype=torch.float64)) for _ in range(2)]

    def eps(x, t, y):
        return torch.where((y == 0)[:, None], oracles[0].eps(x, t), oracles[1].eps(x, t))

    def v(x, t, y):  # v = (ε − σ·x)/α, the same prediction in the other parameterisation
        alpha, sigma = SCHEDULE.marginal_alpha(t)[:, None], SCHEDULE.marginal_std(t)[:, None]
        return (eps(x, t, y) - sigma * x) / alpha

    return eps, v


@pytest.mark.parametrize("scale", [None, 2.5])
def test_guided_v_model_gives_the_eps_of_the_equivalent_eps_model(scale):
    """Solvers see only ε: a v model behind GuidedModel(v_schedule=...) must give the ε model's values,
    guided or not, at knots and between them (DPM-Solver evaluates off-knot times)."""
    eps_model, v_model = _gaussian_models()
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    t = torch.tensor([1e-3, 0.0375, 0.33333, 0.7, 1.0], dtype=torch.float64)
    y = torch.ones(5, dtype=torch.long)
    kwargs = dict(y=y, scale=scale, convention="dit", null_label=0)
    want = GuidedModel(eps_model, lambda s: s, **kwargs)(x, t)
    got = GuidedModel(v_model, lambda s: s, v_schedule=SCHEDULE, **kwargs)(x, t)
    assert torch.allclose(got, want, atol=1e-12, rtol=0)


def test_recipe_prediction_reaches_the_objective_and_the_sampler():
    recipe = {"diffusion": {"schedule": {"type": "linear"}, "time_input": "dimr_log_snr", "prediction": "v"},
              "sample": {}}
    assert build_objective(recipe).prediction == "v"
    fn = guided_eps_fn(torch.nn.Identity(), recipe, SCHEDULE, None, guidance_settings(recipe), eps_channels=3)
    assert fn.v_schedule is SCHEDULE
    eps_recipe = {"diffusion": {**recipe["diffusion"], "prediction": "eps"}, "sample": {}}
    assert guided_eps_fn(torch.nn.Identity(), eps_recipe, SCHEDULE, None, guidance_settings(eps_recipe),
                         eps_channels=3).v_schedule is None


@pytest.mark.parametrize("change, message", [
    ("diffusion.prediction=x0", "prediction"),
    ("diffusion.objective=hybrid_vlb", "eps prediction only"),
])
def test_recipe_validation_names_a_bad_prediction(change, message):
    import zoo
    from zoo.errors import UserError

    with pytest.raises(UserError, match=message) as err:
        zoo.load_recipe(str(Path(__file__).parents[1] / "recipes/emoji32/dimr_2r.yaml"), ["diffusion.prediction=v", change])
    assert "diffusion" in str(err.value)


@pytest.mark.parametrize("learn_sigma", [True, None])  # None: DiT's default, which learns sigma
def test_v_prediction_of_a_learned_sigma_model_is_refused_by_the_recipe(tmp_path, learn_sigma):
    """It validated, and zoo sample then failed in v_to_eps on the 2C-channel [v | sigma] output."""
    import yaml

    import zoo
    from zoo.errors import UserError

    spec = yaml.safe_load((Path(__file__).parent / "recipes" / "tiny_dit_pixels.yaml").read_text())
    spec["model"].pop("learn_sigma")
    if learn_sigma is not None:
        spec["model"]["learn_sigma"] = learn_sigma
    spec["diffusion"].update(prediction="v", objective="eps_mse")
    recipe = tmp_path / "v.yaml"
    recipe.write_text(yaml.safe_dump(spec))
    with pytest.raises(UserError, match=r"key diffusion.prediction: a learned-sigma model .* eps prediction only"):
        zoo.load_recipe(str(recipe))
    assert zoo.load_recipe(str(recipe), ["model.learn_sigma=false"])["diffusion"]["prediction"] == "v"
