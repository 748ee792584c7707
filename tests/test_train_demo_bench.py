"""benchmarks/train_demo.py: a GPU-only option on a machine without one is refused (one line, exit 2)."""

from __future__ import annotations

import sys

import pytest
import torch

from benchmark_scripts import load_benchmark


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_paper_without_a_gpu_is_refused_before_anything_runs(monkeypatch, capsys):
    """It printed 'skipped' on stderr, timed the emoji recipes and exited 0, unlike every other benchmark."""
    bench = load_benchmark("train_demo")
    monkeypatch.setattr(bench, "launch", lambda *a, **k: pytest.fail("a recipe ran despite the refusal"))
    monkeypatch.setattr(sys, "argv", ["train_demo.py", "--paper"])
    with pytest.raises(SystemExit) as exit_:
        bench.main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    assert err.splitlines()[-1].startswith("train_demo.py: error: --paper: no CUDA GPU is available on this machine")


def test_paper_recipes_train_on_synthetic_data_of_their_models_shape(tmp_path, capsys):
    """--paper failed for every paper recipe: the swap to synthetic data kept the latent recipes'
    data.image_size (256 px) where synthetic images take the model's input size (32). Each paper recipe
    now passes the checks zoo train makes before step 1; a small latent recipe (DiT-S/8) times a step."""
    import json

    import zoo
    from zoo.meta import build_on_meta
    from zoo.training.fit import check_recipe_fits_model

    bench = load_benchmark("train_demo")
    root = bench.ROOT / "recipes"
    for name in bench.PAPER:
        overrides = bench.synthetic_data(str(root / f"{name}.yaml"), [])
        assert "data.image_size=32" in overrides, name
        recipe = zoo.load_recipe(root / f"{name}.yaml", overrides)
        check_recipe_fits_model(recipe, build_on_meta(lambda: zoo.build_model(recipe)))
    capsys.readouterr()
    bench.one(str(root / "dit_s_8.yaml"), steps=1, warmup=0, batch=2, precision=None, out=str(tmp_path))
    row = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert row["recipe"] == "dit_s_8" and row["batch"] == 2 and row["steps_per_s"] > 0 and row["peak_gib"] > 0
    assert not (tmp_path / "last").exists()  # no checkpoint written (GBs per paper recipe on the GPU machine)
