"""Pins on numbers the rest of the suite let drift (each was a surviving mutation):

* the lr decay goes from ``lr`` down to ``train.min_lr`` (``floor + (lr - floor) * shape``), not
  ``floor + lr * shape``: checked against hand-computed linear and cosine values;
* the sampler's per-sample streams (x_T 0, labels 1, solver noise 2) are distinct generators, and
  the labels come from ``sample_seed(seed, i, 1)`` as documented in :mod:`zoo.seeds`;
* the training streams (sampler 0-2, ``TRAIN_STREAM``, ``DATA_STREAM``, ``VAL_STREAM`` and the two
  after it) are pairwise distinct, and a keyed latent dataset's eps for global sample ``g`` is not
  the training draw's noise for the same ``g`` (the two would be one random vector, used twice);
* ``EpochSampler`` draws a fresh permutation each epoch (the epoch enters the seed);
* ADM's centre crop rounds an odd excess down (``(width - size) // 2``), checked on ramps whose
  pixel values are their column / row, so a one-pixel shift shows;
* the ``time_quadratic`` grid is uniform in sqrt(t) (DDIM / DPM-Solver's ``get_time_steps``).

Every expectation is derived by hand or from an independent formula, not read back from the code.
"""

from __future__ import annotations

import math

import pytest
import torch

import zoo
from zoo.seeds import initial_noise, sample_labels, sample_seed, solver_generators
from zoo.training.data import DATA_STREAM, EpochSampler
from zoo.training.draws import TRAIN_STREAM
from zoo.training.optim import learning_rate
from zoo.training.val_loss import VAL_STREAM


# --- 1. learning-rate decay floor ------------------------------------------------------------------

def _train(kind: str) -> dict:
    # warm-up 10 steps, then decay over steps 10..110 (100 steps) from lr 1 to min_lr 0.1
    return {"lr": 1.0, "min_lr": 0.1, "lr_schedule": kind, "steps": 110, "warmup_steps": 10}


@pytest.mark.parametrize("kind, step, expected", [
    ("linear", 60, 0.1 + 0.9 * 0.5),        # progress 0.5: shape 0.5 -> 0.55
    ("linear", 35, 0.1 + 0.9 * 0.75),       # progress 0.25: shape 0.75 -> 0.775
    ("linear", 110, 0.1),                   # the end: the floor
    ("cosine", 60, 0.1 + 0.9 * 0.5),        # cos(pi/2) = 0: shape 0.5 -> 0.55
    ("cosine", 35, 0.1 + 0.9 * (0.5 + math.sqrt(2) / 4)),  # cos(pi/4) = sqrt2/2 -> 0.868198...
    ("cosine", 85, 0.1 + 0.9 * (0.5 - math.sqrt(2) / 4)),  # cos(3pi/4) = -sqrt2/2 -> 0.231801...
])
def test_lr_decays_from_lr_to_min_lr(kind, step, expected):
    assert learning_rate(_train(kind), step) == pytest.approx(expected, rel=1e-12)


def test_lr_decay_with_min_lr_hand_values():
    assert learning_rate(_train("linear"), 60) == pytest.approx(0.55)
    assert learning_rate(_train("cosine"), 60) == pytest.approx(0.55)
    assert learning_rate(_train("cosine"), 35) == pytest.approx(0.8681980515339464)
    assert learning_rate(_train("linear"), 10) == pytest.approx(1.0)  # decay starts at lr
    assert learning_rate(_train("linear"), 5) == pytest.approx(0.5)   # warm-up: lr * step / warmup


# --- 2. sampler streams ----------------------------------------------------------------------------

def test_solver_noise_is_not_the_initial_noise_of_the_same_sample():
    seed, shape = 123, (3, 4, 4)
    for i in (0, 5):
        x_T = initial_noise(1, shape, seed, start=i)[0]
        solver_first = torch.randn(shape, generator=solver_generators(seed, i, 1)[0])
        assert not torch.equal(solver_first, x_T)
        # x_T is stream 0's, the solver's stream 2's (zoo.sample: noise 0, label 1, solver 2)
        expected_x_T = torch.randn(shape, generator=torch.Generator().manual_seed(sample_seed(seed, i, 0)))
        expected_solver = torch.randn(shape, generator=torch.Generator().manual_seed(sample_seed(seed, i, 2)))
        assert torch.equal(x_T, expected_x_T)
        assert torch.equal(solver_first, expected_solver)


def test_sample_labels_come_from_stream_one():
    seed, n, classes, start = 7, 12, 1000, 3
    labels = sample_labels(n, classes, seed, start=start)
    expected = torch.stack([torch.randint(classes, (), generator=torch.Generator().manual_seed(
        sample_seed(seed, start + i, 1))) for i in range(n)])
    assert torch.equal(labels, expected)
    solver = torch.stack([torch.randint(classes, (), generator=torch.Generator().manual_seed(
        sample_seed(seed, start + i, 2))) for i in range(n)])
    assert not torch.equal(labels, solver)


# --- 3. training streams ---------------------------------------------------------------------------

def test_training_streams_are_pairwise_distinct():
    streams = {"noise": 0, "labels": 1, "solver": 2, "TRAIN_STREAM": TRAIN_STREAM, "DATA_STREAM": DATA_STREAM,
               "VAL_STREAM": VAL_STREAM, "VAL_STREAM+1": VAL_STREAM + 1, "VAL_STREAM+2": VAL_STREAM + 2}
    assert len(set(streams.values())) == len(streams), streams
    assert all(0 <= s < 256 for s in streams.values())  # sample_seed keeps 8 bits for the stream


def test_keyed_latent_eps_is_not_the_training_noise_of_the_same_sample():
    from zoo.diffusion.setup import build_objective
    from zoo.training.draws import draw
    from zoo.training.latents import LatentMoments
    from pathlib import Path

    C, h, w = 4, 4, 4
    ds = LatentMoments.__new__(LatentMoments)  # no shards: moments (mean 0, std 1) make z the drawn eps itself
    ds.moments = lambda index: (torch.zeros(2, C, h, w), torch.ones(2, C, h, w))
    ds.flip, ds.vae_scale, ds.labels = False, 1.0, [0] * 8
    seed, batch = 5, 4
    sampler = iter(EpochSampler(8, batch, seed, keyed=True))
    items = [next(sampler) for _ in range(batch)]  # global positions 0..3
    for g, (index, key) in enumerate(items):
        assert key == sample_seed(seed, g, DATA_STREAM)
        assert key != sample_seed(seed, g, TRAIN_STREAM)
    eps = torch.stack([ds[item][0] for item in items])
    recipe = zoo.load_recipe(Path(__file__).parent / "recipes" / "tiny_train.yaml", [])
    noise = draw(range(0, batch), seed, (C, h, w), build_objective(recipe)).noise
    for g in range(batch):
        assert not torch.allclose(eps[g], noise[g])


# --- 4. EpochSampler: a new permutation each epoch -------------------------------------------------

def test_epoch_sampler_reshuffles_each_epoch():
    n, batch = 16, 4
    it = iter(EpochSampler(n, batch, seed=11))
    epoch0 = [next(it) for _ in range(n)]
    epoch1 = [next(it) for _ in range(n)]
    assert sorted(epoch0) == list(range(n)) and sorted(epoch1) == list(range(n))
    assert epoch0 != epoch1
    # each is the documented permutation of (seed, epoch)
    for e, order in enumerate((epoch0, epoch1)):
        gen = torch.Generator().manual_seed(11 * 100003 + e)
        assert order == torch.randperm(n, generator=gen).tolist()


# --- 5. ADM centre crop rounds an odd excess down --------------------------------------------------

def test_adm_center_crop_odd_excess_rounds_down():
    from PIL import Image

    from zoo.training.crop import adm_center_crop

    # 33 wide, 16 high, cropped to 16: no halving (16 < 32), no resize (scale 1), left = (33-16)//2 = 8
    wide = Image.new("L", (33, 16))
    wide.putdata([x * 7 for y in range(16) for x in range(33)])
    out = adm_center_crop(wide, 16)
    assert out.size == (16, 16)
    assert [out.getpixel((x, 0)) for x in range(16)] == [x * 7 for x in range(8, 24)]
    # 16 wide, 35 high: top = (35-16)//2 = 9
    tall = Image.new("L", (16, 35))
    tall.putdata([y * 7 for y in range(35) for x in range(16)])
    out = adm_center_crop(tall, 16)
    assert out.size == (16, 16)
    assert [out.getpixel((0, y)) for y in range(16)] == [y * 7 for y in range(9, 25)]


# --- 6. time_quadratic grid -----------------------------------------------------------------------

def test_time_quadratic_grid_is_uniform_in_sqrt_t():
    from zoo.solvers.base import time_grid

    # sqrt: 1, 0.7, 0.4, 0.1 -> t: 1, 0.49, 0.16, 0.01
    assert time_grid(None, "time_quadratic", 1.0, 0.01, 3) == pytest.approx([1.0, 0.49, 0.16, 0.01], abs=1e-12)
    t_start, t_end, n = 0.9, 1e-3, 7
    a, b = math.sqrt(t_start), math.sqrt(t_end)
    expected = [(a + (b - a) * k / n) ** 2 for k in range(n + 1)]
    assert time_grid(None, "time_quadratic", t_start, t_end, n) == pytest.approx(expected, abs=1e-12)


def test_the_seed_function_eval_protocols_name_imports_under_that_name():
    """Every eval result records 'zoo.sample.sample_seed(seed, index, stream)': it moved to zoo.seeds, and the
    recorded name stays (it is hashed into the samples folder's name), so it must still import."""
    import zoo.seeds
    from zoo.sample import sample_seed as recorded

    assert recorded is zoo.seeds.sample_seed
