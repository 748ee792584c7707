"""diffusion.time_sampling: which training times the loss sees (uniform, or SD3's logit-normal)."""

import math
from pathlib import Path

import pytest
import torch

import zoo
from zoo.diffusion.setup import build_objective
from zoo.diffusion.time_input import index_to_time, training_times
from zoo.diffusion.time_sampling import UNIFORM, TimeSampling
from zoo.errors import UserError
from zoo.seeds import sample_seed
from zoo.training.draws import TRAIN_STREAM, draw

N = 1000
TINY = Path(__file__).parent / "recipes" / "tiny_train.yaml"


def normal_cdf(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def logit(p: float) -> float:
    return math.log(p / (1.0 - p))


@pytest.mark.parametrize("mean,std", [(0.0, 1.0), (1.0, 0.5), (-0.5, 1.6)])
def test_logit_normal_discrete_times_follow_the_logit_normal_cdf(mean, std):
    """P(index < k) = P(sigmoid(m + s z) < k/N) = Phi((logit(k/N) - m)/s): checked at five k within
    5 standard errors of the empirical fraction (n = 200000, so a wrong m, s or rounding shows)."""
    n = 200_000
    t = TimeSampling("logit_normal", mean, std).draw((n,), N, False, generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.float64 and t.shape == (n,)
    index = t * N - 1
    assert torch.equal(index, index.round()) and index.min() >= 0 and index.max() <= N - 1  # knots only
    for k in (50, 250, 500, 750, 950):
        expected = normal_cdf((logit(k / N) - mean) / std)
        observed = (index < k).double().mean().item()
        assert abs(observed - expected) < 5 * math.sqrt(expected * (1 - expected) / n) + 1e-12, (k, observed, expected)


def test_logit_normal_concentrates_on_middle_noise_and_uniform_does_not():
    g = torch.Generator().manual_seed(1)
    middle = lambda t: ((t > 0.25) & (t <= 0.75)).double().mean().item()  # noqa: E731
    assert abs(middle(training_times(100_000, N, generator=g)) - 0.5) < 0.01
    # P(|z| < logit(0.75)) for z ~ N(0, 1): 0.7291
    ln = TimeSampling.from_spec({"type": "logit_normal"}).draw((100_000,), N, False, generator=g)
    assert abs(middle(ln) - (2 * normal_cdf(logit(0.75)) - 1)) < 0.01


def test_logit_normal_continuous_times_lie_in_t_min_to_one():
    t = TimeSampling("logit_normal").draw((50_000,), N, True, t_min=0.2, generator=torch.Generator().manual_seed(2))
    assert t.min() > 0.2 and t.max() < 1.0
    assert len(torch.unique(t)) > 49_000  # not snapped to knots
    assert abs(t.median().item() - 0.6) < 0.01  # sigmoid(0) = 1/2 maps to the middle of [0.2, 1]


def test_uniform_is_the_draw_the_trainer_always_made():
    """Existing runs resume with the same draws: uniform is one randint (discrete) or rand (continuous)."""
    gen = lambda: torch.Generator().manual_seed(sample_seed(3, 7, TRAIN_STREAM))  # noqa: E731
    assert torch.equal(UNIFORM.draw((), N, False, generator=gen()),
                       index_to_time(torch.randint(0, N, (), generator=gen()), N))
    assert torch.equal(UNIFORM.draw((), N, True, t_min=0.1, generator=gen()),
                       0.1 + 0.9 * torch.rand((), generator=gen(), dtype=torch.float64))
    assert TimeSampling.from_spec(None) == TimeSampling.from_spec("uniform") == UNIFORM


def per_sample_draw(indices: range, seed: int, shape: tuple[int, ...], objective) -> tuple[torch.Tensor, ...]:
    """The trainer's draws as first written: a generator per sample, its time, noise and uniforms, then stacked."""
    t, noise, u = [], [], []
    for g in indices:
        gen = torch.Generator().manual_seed(sample_seed(seed, g, TRAIN_STREAM))
        t.append(objective.time_sampling.draw((), objective.num_steps, objective.continuous, objective.t_min, gen))
        noise.append(torch.randn(shape, generator=gen))
        u.append(torch.rand(2, generator=gen))
    u = torch.stack(u)
    return torch.stack(t), torch.stack(noise), u[:, 0], u[:, 1]


@pytest.mark.parametrize("sampling", [UNIFORM, TimeSampling("logit_normal", 0.5, 1.2)], ids=["uniform", "logit"])
@pytest.mark.parametrize("continuous", [False, True], ids=["discrete", "continuous"])
@pytest.mark.parametrize("shape,dtype", [((4, 8, 8), torch.float32), ((3, 5, 7), torch.float64), ((2, 3), torch.float32)])
def test_draws_are_bit_identical_to_a_generator_per_sample(sampling, continuous, shape, dtype):
    """draw re-seeds one generator per sample, fills its rows in place and maps the times once for the batch:
    the draws (what a run's reproducibility across process counts rests on) are the same bits as before."""
    from types import SimpleNamespace

    objective = SimpleNamespace(time_sampling=sampling, num_steps=N, continuous=continuous, t_min=1e-3)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # the noise takes the default dtype, both ways
    try:
        for indices, seed in ((range(0, 1), 0), (range(37, 37 + 29), 5), (range(1 << 20, (1 << 20) + 64), 1234)):
            fast = draw(indices, seed, shape, objective)
            reference = per_sample_draw(indices, seed, shape, objective)
            for name, got, want in zip(("t", "noise", "drop", "flip"), (fast.t, fast.noise, fast.drop, fast.flip),
                                       reference):
                assert got.dtype == want.dtype and torch.equal(got, want), (name, indices)
    finally:
        torch.set_default_dtype(default)


def test_a_recipe_reaches_the_trainers_draws():
    recipe = zoo.load_recipe(TINY, ["diffusion.time_sampling.type=logit_normal", "diffusion.time_sampling.mean=1.5",
                                    "diffusion.time_sampling.std=0.25"])
    objective = build_objective(recipe)
    assert objective.time_sampling == TimeSampling("logit_normal", 1.5, 0.25)
    d = draw(range(0, 512), 0, (3, 4, 4), objective)
    # logit(t) ~ N(1.5, 0.25): every time above sigmoid(1.5 - 6*0.25) = 0.5, most near sigmoid(1.5) = 0.82
    assert d.t.min() > 0.5 and abs(d.t.median().item() - 1 / (1 + math.exp(-1.5))) < 0.01
    plain = draw(range(0, 512), 0, (3, 4, 4), build_objective(zoo.load_recipe(TINY)))
    assert plain.t.min() < 0.1  # uniform reaches the low-noise end


def test_objective_draws_with_its_sampling_without_given_draws():
    objective = build_objective(zoo.load_recipe(TINY, ["diffusion.time_sampling.type=logit_normal",
                                                       "diffusion.time_sampling.mean=-3"]))
    t = objective.sample_times(4096, torch.Generator().manual_seed(0))
    assert abs(t.median().item() - 1 / (1 + math.exp(3))) < 0.005


@pytest.mark.parametrize("override,message", [
    ("diffusion.time_sampling=logitnormal", "did you mean logit_normal"),
    ("diffusion.time_sampling.type=normal", "time_sampling.type"),
    ("diffusion.time_sampling.std=0", "std"),
    ("diffusion.time_sampling=3", "expected a time sampling name"),
])
def test_bad_time_sampling_is_named(override, message):
    overrides = ["diffusion.time_sampling.type=logit_normal"] if ".std" in override else []
    with pytest.raises(UserError, match=message):
        zoo.load_recipe(TINY, overrides + [override])


def test_uniform_takes_no_logit_normal_keys():
    with pytest.raises(UserError, match="unknown key 'std' in time sampling 'uniform'"):
        zoo.load_recipe(TINY, ["diffusion.time_sampling.type=uniform", "diffusion.time_sampling.std=2"])


def test_time_sampling_checks_its_own_arguments():
    with pytest.raises(ValueError, match="unknown time sampling"):
        TimeSampling("beta")
    with pytest.raises(ValueError, match="std must be > 0"):
        TimeSampling("logit_normal", std=0.0)


def test_the_recipe_validator_knows_every_sampling_and_its_keys():
    """The validator's table (torch-free) and the implementation's must list the same samplings and keys."""
    from zoo.diffusion.sections import TIME_SAMPLINGS as CHECKED
    from zoo.diffusion.time_sampling import TIME_SAMPLINGS

    assert {name: set(keys) - {"type"} for name, keys in CHECKED.items()} == \
        {name: set(keys) for name, keys in TIME_SAMPLINGS.items()}


def test_an_empty_time_sampling_is_uniform_like_an_empty_objective_is_eps_mse():
    recipe = zoo.load_recipe(TINY, ["diffusion.time_sampling={}"])
    assert build_objective(recipe).time_sampling == UNIFORM
