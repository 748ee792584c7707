"""Pins on solvers/base.py's API contracts that no other test held (mutation round 8b): the
per-sample generator count of ``gaussian_noise``, the ``[ε̂ | v]`` split only for outputs of x's
spatial size, and ``t_end`` refused where α rounds to 1 (σ = 0: no noise level to stop at).
Each would otherwise fail far from its cause, or not at all: uninitialised noise rows, an ε̂ that
broadcasts over the image, a math-domain error in the time grid.
"""

from __future__ import annotations

import pytest
import torch

from zoo.errors import UserError
from zoo.solvers import build_schedule
from zoo.solvers.base import ScheduledModel, Solver, gaussian_noise, split_model_output

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("count", [2, 4])
def test_gaussian_noise_refuses_a_generator_count_other_than_the_batch(count):
    """Without the check, 2 generators for 3 samples left row 3 as uninitialised torch.empty memory
    (and 4 failed with an index error): per-sample noise that is not noise."""
    like = torch.zeros(3, 2, 4, dtype=torch.float64)
    gens = [torch.Generator().manual_seed(i) for i in range(count)]
    with pytest.raises(ValueError, match=f"{count} generators for a batch of 3"):
        gaussian_noise(like, gens)


def test_gaussian_noise_one_generator_per_sample_is_each_samples_own_stream():
    """Sample i's noise comes from generator i alone, whatever the batch it sits in."""
    like = torch.zeros(2, 5, dtype=torch.float64)
    noise = gaussian_noise(like, [torch.Generator().manual_seed(7), torch.Generator().manual_seed(8)])
    alone = gaussian_noise(like[:1], [torch.Generator().manual_seed(8)])
    assert noise.dtype == torch.float64 and torch.equal(noise[1], alone[0])


def test_a_2c_channel_output_of_another_spatial_size_is_not_split_as_eps_and_v():
    """Split on the channel count alone, a (B, 2C, 1, 1) output gave a (B, C, 1, 1) ε̂ that broadcasts
    over the whole image in every solver step instead of being refused."""
    x = torch.zeros(2, 3, 4, 4)
    with pytest.raises(UserError, match="eps_fn returned shape"):
        split_model_output(torch.zeros(2, 6, 1, 1), x)
    eps, v = split_model_output(torch.arange(2 * 6 * 16.0).reshape(2, 6, 4, 4), x)  # the real [ε̂ | v]
    assert eps.shape == v.shape == x.shape and eps[0, 0, 0, 0] == 0 and v[0, 0, 0, 0] == 48


def test_t_end_where_alpha_rounds_to_one_is_refused():
    """On the cosine schedule log α(1e-17) is exactly 0.0 (σ = 0, λ = +inf): a noise test of ``<= 0``
    let it through, and the grid then failed with a math domain error instead of naming t_end."""
    schedule = build_schedule("cosine")
    with pytest.raises(UserError, match="below the first noise level"):
        Solver(steps=2, t_end=1e-17).time_range(schedule)
    assert Solver(steps=2, t_end=1e-12).time_range(schedule)[1] == 1e-12  # still noisy there: allowed


@pytest.mark.parametrize("dtype, t_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                            (torch.float64, torch.float64)])
def test_the_model_gets_time_in_float32_at_least(dtype, t_dtype):
    """t in x's dtype reached a half-precision model as bfloat16: t = 0.3 became 0.30078125, a
    different noise level from the one the solver's coefficients are computed for."""
    seen = []

    def eps_fn(x, t):
        seen.append(t)
        return torch.zeros_like(x)

    model = ScheduledModel(eps_fn, build_schedule("vp_linear"))
    model.eps(torch.zeros(2, 3, dtype=dtype), model.at(0.3))
    assert seen[0].dtype == t_dtype and seen[0].tolist() == [torch.tensor(0.3, dtype=t_dtype).item()] * 2
    assert model.nfe == 1


def test_zero_steps_are_refused():
    """A solver built with steps=0 would return x_T untouched (pure noise) as a sample."""
    with pytest.raises(UserError, match="steps must be a positive integer"):
        Solver(steps=0)
    assert Solver(steps=1).steps == 1
