"""``zoo export diffusers RUN`` takes a zoo train run directory as its newest checkpoint, as sample and eval do."""

from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

from safetensors.torch import load_file  # noqa: E402

import zoo  # noqa: E402
from zoo.checkpoint import EMA, MODEL, save_checkpoint  # noqa: E402
from zoo.cli import main  # noqa: E402
from zoo.integrations.diffusers import ZooTransformer2DModel  # noqa: E402

RECIPE = Path(__file__).parent / "recipes" / "tiny_train.yaml"


def exported(out: Path) -> dict[str, torch.Tensor]:
    return ZooTransformer2DModel.from_pretrained(out).backbone.state_dict()


def test_export_of_a_run_directory_writes_its_last_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(RECIPE), "--out", str(run), "--set", "train.steps=2", "--set", "train.sample_every=0"]) == 0
    model, ema = load_file(run / "last" / MODEL), load_file(run / "last" / EMA)
    assert any(not torch.equal(v, model[k]) for k, v in ema.items())  # so the two choices can be told apart
    capsys.readouterr()
    assert main(["export", "diffusers", str(run), "--out", str(tmp_path / "hf")]) == 0
    assert f"from {run / 'last'}" in capsys.readouterr().out
    weights = exported(tmp_path / "hf")
    assert weights.keys() == model.keys()
    assert all(torch.equal(v, ema.get(k, model[k])) for k, v in weights.items())  # EMA by default, as for a checkpoint
    assert main(["export", "diffusers", str(run), "--out", str(tmp_path / "hf"), "--weights", "model", "--force"]) == 0
    assert all(torch.equal(v, model[k]) for k, v in exported(tmp_path / "hf").items())
    # asked for EMA weights a checkpoint does not have, it exported the raw ones under that name
    ckpt = save_checkpoint(tmp_path / "no_ema", zoo.build_model(zoo.load_recipe(RECIPE)), zoo.load_recipe(RECIPE))
    assert main(["export", "diffusers", str(ckpt), "--out", str(tmp_path / "hf3"), "--weights", "ema"]) == 2
    assert f"--weights ema: {ckpt} has no EMA weights" in capsys.readouterr().err
    assert not (tmp_path / "hf3").exists()
    # one whose EMA file went missing is incomplete: 'drop --weights, or --weights raw' would not have helped
    (run / "last" / EMA).rename(tmp_path / "ema.safetensors")
    assert main(["export", "diffusers", str(run), "--out", str(tmp_path / "hf3"), "--weights", "ema"]) == 2
    assert capsys.readouterr().err == (f"zoo: error: checkpoint {run / 'last'} is incomplete: ema.safetensors is "
                                       f"missing ({run / 'step_0000002'} is the run's newest complete checkpoint)\n")
    (tmp_path / "ema.safetensors").rename(run / "last" / EMA)
    # zoo eval's word for them works here too (it was 'invalid choice: raw (choose from ema, model)')
    assert main(["export", "diffusers", str(run), "--out", str(tmp_path / "hf2"), "--weights", "raw"]) == 0
    assert all(torch.equal(v, model[k]) for k, v in exported(tmp_path / "hf2").items())


def test_export_of_a_directory_that_is_neither_is_still_refused(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["export", "diffusers", str(tmp_path / "empty"), "--out", str(tmp_path / "hf")]) == 2
    assert main(["export", "diffusers", str(tmp_path / "missing"), "--out", str(tmp_path / "hf")]) == 2
    assert "is not a checkpoint directory" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()
