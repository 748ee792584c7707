"""Pins on configuration a recipe relies on that a fifth round of mutation testing could change unseen:
the ranges that refuse a value, the learning-rate schedule's ends, no_weight_decay_1d, the diffusion
defaults, a .PNG output."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import zoo
from zoo.errors import UserError
from zoo.training.optim import learning_rate, param_groups

RECIPE = Path(__file__).parent / "recipes" / "tiny_train.yaml"


@pytest.mark.parametrize("override, words", [
    ("train.seed=72057594037927936", "train.seed"),  # 2**56: a seed outside draws another seed's numbers
    ("sample.seed=72057594037927936", "sample.seed"),
    ("train.eval_n=1", "train.eval_n"),  # an FD needs two samples for a covariance
    ("data.vae_scale=0", "data.vae_scale"),
    ("data.vae_scale=-1", "data.vae_scale"),
    ("diffusion.null_label=-1", "diffusion.null_label"),
    ("diffusion.min_snr_gamma=0.0001", "diffusion.min_snr_gamma"),
    ("train.betas=[0.9]", "train.betas"),
    ("train.betas=[0.9, 0.99, 0.5]", "train.betas"),
])
def test_a_value_outside_its_range_is_refused_naming_its_key(override, words):
    """Each range was widened by one mutation and no test noticed (e.g. a one-element betas was accepted)."""
    with pytest.raises(UserError) as err:
        zoo.load_recipe(RECIPE, [override])
    assert words in str(err.value)


def test_a_decay_stays_at_min_lr_past_its_steps_and_no_decay_fits_in_the_warmup():
    """Past train.steps the decay stayed at min_lr only through a min(1, ...) cap; steps == warmup_steps
    divided by zero without the <= guard."""
    train = {"lr": 1.0, "min_lr": 0.1, "warmup_steps": 0, "steps": 100, "lr_schedule": "linear"}
    assert learning_rate(train, 100) == pytest.approx(0.1) and learning_rate(train, 120) == pytest.approx(0.1)
    assert learning_rate({**train, "lr_schedule": "cosine"}, 150) == pytest.approx(0.1)
    assert learning_rate({**train, "lr_schedule": "cosine"}, 50) == pytest.approx(0.1 + 0.9 * 0.5)
    assert learning_rate({"lr": 1.0, "warmup_steps": 10, "steps": 10, "lr_schedule": "cosine"}, 10) == 1.0


def test_no_weight_decay_1d_spares_every_bias_and_norm_weight():
    """The 1-D test (p.ndim <= 1) made < 1 spared nothing, and no test looked."""
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    decayed, spared = param_groups(model, 0.1, True)
    assert decayed["names"] == ["0.weight", "2.weight"] and decayed["weight_decay"] == 0.1
    assert spared["names"] == ["0.bias", "1.weight", "1.bias", "2.bias"] and spared["weight_decay"] == 0.0
    decayed, spared = param_groups(model, 0.1, False)
    assert len(decayed["names"]) == 6 and spared["names"] == []


def test_a_recipe_without_a_schedule_trains_under_ddpms_linear_betas():
    """DDPM's betas 1e-4 .. 0.02 over 1000 steps are the default schedule (the official DiT and U-ViT's)."""
    from zoo.diffusion.setup import build_schedule

    schedule = build_schedule({"diffusion": {}})
    expected = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    torch.testing.assert_close(schedule.betas.double(), expected, rtol=0, atol=1e-12)


def test_an_upper_case_png_suffix_is_a_png(tmp_path):
    """grid.PNG is a PNG file name: the suffix check is case-blind."""
    from zoo.guards import check_png_output

    assert check_png_output(tmp_path / "grid.PNG") == tmp_path / "grid.PNG"
    with pytest.raises(UserError):
        check_png_output(tmp_path / "grid.jpg")
