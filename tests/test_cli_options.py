"""Small option fixes of the CLI: export npz's suffix case, prepare-latents' bar off a terminal, seed ranges."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from zoo.cli import main
from zoo.errors import UserError
from zoo.eval.reference import save_npz
from zoo.sample import SampleRequest
from zoo.seeds import SEEDS, check_seed, initial_noise

RECIPE = Path(__file__).parent / "recipes" / "tiny_train.yaml"


def test_export_npz_takes_an_upper_case_suffix(tmp_path, capsys):
    """`zoo export npz --out s.NPZ` was refused while `zoo sample --out g.PNG` is taken."""
    samples = tmp_path / "samples"
    images = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    save_npz(samples / "shard-0000000-0000002.npz", images=images, labels=np.arange(2), indices=np.arange(2))
    assert main(["export", "npz", str(samples), "--out", str(tmp_path / "s.NPZ")]) == 0, capsys.readouterr().err
    np.testing.assert_array_equal(np.load(tmp_path / "s.NPZ")["arr_0"], images)  # no s.NPZ.npz beside it


def test_prepare_latents_draws_no_bar_off_a_terminal(monkeypatch, tmp_path, capsys):
    """Its bar was drawn into a log file (stderr not a TTY), where zoo sample and zoo eval draw none."""
    import zoo.latents
    from zoo.commands import prepare_latents as command

    bars = []

    def fake(*args, progress=None, **kwargs):
        bars.append(progress(total=3, unit="img", desc="encode"))
        bars[-1].close()
        return True

    monkeypatch.setattr(command, "_checked_device", lambda args: "cpu")
    monkeypatch.setattr(zoo.latents, "prepare_latents", fake)
    assert main(["prepare-latents", str(tmp_path), "--vae", str(tmp_path), "--out", str(tmp_path / "lat")]) == 0
    assert bars[0].disable and "encode" not in capsys.readouterr().err


def test_seeds_outside_0_to_2_56_are_refused_not_aliased():
    """The per-sample seeds keep a seed's low 56 bits: --seed 2^56 drew the images of --seed 0, and a negative
    seed those of 2^56 minus it."""
    assert torch.equal(initial_noise(1, (2,), SEEDS), initial_noise(1, (2,), 0))  # why: they alias
    for seed in (-1, SEEDS, 2**63):
        with pytest.raises(UserError, match=f"seed \\(--seed\\) {seed} is outside 0..{SEEDS - 1}"):
            SampleRequest(n=1, seed=seed).count()
    SampleRequest(n=1, seed=SEEDS - 1).count()
    check_seed(0)


@pytest.mark.parametrize("seed", ["-1", str(2**56)])
def test_zoo_sample_and_eval_refuse_a_seed_outside_the_range_in_one_line(seed, tmp_path, capsys):
    assert main(["sample", str(RECIPE), "--n", "1", "--steps", "2", "--seed", seed, "--out",
                 str(tmp_path / "g.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"zoo: error: --seed {seed} is outside 0..") and not (tmp_path / "g.png").exists()
    assert "Building" not in err  # refused before the model is built
    assert main(["eval", str(tmp_path), "--n", "4", "--seed", seed]) == 2
    assert capsys.readouterr().err.startswith(f"zoo: error: --seed {seed} is outside 0..")


@pytest.mark.parametrize("section", ["train", "sample"])
def test_a_recipe_seed_past_56_bits_is_refused(section):
    """train.seed and sample.seed allowed up to 2^63 - 1; the per-sample seeds keep 56 bits, so 2^56 trained and
    sampled with the draws of seed 0."""
    import zoo

    zoo.load_recipe(RECIPE, [f"{section}.seed={SEEDS - 1}"])
    with pytest.raises(UserError, match=f"{section}.seed"):
        zoo.load_recipe(RECIPE, [f"{section}.seed={SEEDS}"])


def test_prepare_latents_workers_default_to_the_cpus_this_process_may_use(monkeypatch):
    """It took os.cpu_count(): 8 decoding processes on a job pinned to one CPU (taskset, a container)."""
    import argparse
    import os

    from zoo.commands import prepare_latents

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    parser = argparse.ArgumentParser()
    prepare_latents.register(parser.add_subparsers())
    args = parser.parse_args(["prepare-latents", "imgs", "--vae", "v", "--out", "o"])
    assert args.workers == 1


def test_zoo_eval_takes_n_up_to_max_count_inclusive(tmp_path, capsys):
    """--n 100,000,000 (sample.num_samples' own bound) passes the bound, to fail here only on the missing
    checkpoint; one more is refused by the bound."""
    missing = str(tmp_path / "none")
    assert main(["eval", missing, "--n", "100000000"]) == 2
    err = capsys.readouterr().err
    assert "--n must be" not in err and missing in err
    assert main(["eval", missing, "--n", "100000001"]) == 2
    assert "--n must be at least 2 and at most 100,000,000 (as sample.num_samples), got 100000001" in capsys.readouterr().err
