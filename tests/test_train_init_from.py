"""``train.init_from``: a new run that starts from a checkpoint's weights (fine-tuning, or a change
--resume refuses), with step 0, a fresh optimizer and its own schedule."""

import shutil
from pathlib import Path

import pytest
import torch

import zoo
import zoo.checkpoint as ckpt
from zoo.cli import main
from zoo.training import Trainer, train
from zoo.weights import load_weights, save_weights

HERE = Path(__file__).parent / "recipes"
QUIET = lambda *_: None  # noqa: E731
SMALL = ["train.sample_every=0", "train.ckpt_every=0", "train.log_every=1", "train.warmup_steps=0"]


def _recipe(*overrides):
    return zoo.load_recipe(HERE / "tiny_train.yaml", [*SMALL, *overrides])


def _assert_state(module: torch.nn.Module, expected: dict) -> None:
    state = module.state_dict()
    assert state.keys() == expected.keys()
    for k, v in expected.items():
        assert torch.equal(state[k], v), k


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A 3-step run: its EMA (decay 0.99) differs from its model weights, and both from a fresh init."""
    out = tmp_path_factory.mktemp("trained")
    train(_recipe(), out, steps=3, log=QUIET)
    return out


def test_the_model_and_its_ema_start_from_the_checkpoints_ema_weights(tmp_path, trained):
    ema = load_weights(trained / "last" / "ema.safetensors")
    model = load_weights(trained / "last" / "model.safetensors")
    assert any(not torch.equal(ema[k], model[k]) for k in ema)  # the test can tell them apart
    trainer = Trainer(_recipe(f"train.init_from={trained}", "train.lr=1e-2"), tmp_path, log=QUIET)
    assert trainer.step == 0 and trainer.optimizer.state_dict()["state"] == {}
    expected = {**model, **ema}  # the EMA file's parameters, the buffers (DiT's position table) of the model file
    _assert_state(trainer.model, expected)
    for name, shadow in trainer.ema.state_dict().items():
        assert torch.equal(shadow, expected[name]), name
    assert any(f"starts from {trained / 'last' / 'ema.safetensors'}" in line for line in trainer.after_banner)
    assert trainer.optimizer.param_groups[0]["lr"] == 1e-2  # the new recipe's settings, from step 0
    # ... and trains from there: one step's loss is the loss of those weights, not of a fresh init
    fresh = Trainer(_recipe(), tmp_path / "fresh", log=QUIET)
    x, y = next(trainer.batches)
    assert not torch.equal(trainer.train_step(x, y), fresh.train_step(x, y))


def test_a_converted_checkpoint_without_ema_gives_its_model_weights(tmp_path, trained):
    recipe = _recipe()
    with torch.no_grad():
        model = zoo.build_model(recipe)
        for p in model.parameters():
            p.add_(1.0)
    ckpt.save_checkpoint(tmp_path / "converted", model, recipe)  # as zoo convert writes: no ema.safetensors
    trainer = Trainer(_recipe(f"train.init_from={tmp_path / 'converted'}"), tmp_path / "run", log=QUIET)
    _assert_state(trainer.model, model.state_dict())


def test_weights_of_another_model_or_no_checkpoint_are_one_line(tmp_path, trained, capsys):
    argv = ["train", str(HERE / "tiny_train.yaml"), "--out", str(tmp_path / "run"), "--set", "train.sample_every=0"]
    assert main([*argv, "--set", f"train.init_from={trained}", "--set", "model.depth=3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "key train.init_from:" in err and "ema.safetensors does not match the model" in err
    assert "missing keys: blocks.2." in err
    assert main([*argv, "--set", f"train.init_from={tmp_path / 'nowhere'}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "key train.init_from: checkpoint directory" in err and "does not exist" in err
    weights = trained / "last" / "model.safetensors" if (trained / "last").is_dir() else trained / "model.safetensors"
    assert main([*argv, "--set", f"train.init_from={weights}"]) == 2  # a checkpoint's file, not its directory: was
    err = capsys.readouterr().err  # ".../model.safetensors/config.json: a file where a directory is needed"
    assert err.count("\n") == 1 and f"key train.init_from: {weights} is a file, not a checkpoint directory" in err, err
    assert main(["train", str(HERE / "tiny_train.yaml"), "--resume", str(weights), "--set", "train.sample_every=0"]) == 2
    assert f"{weights} is a file, not a checkpoint directory" in capsys.readouterr().err
    assert not (tmp_path / "run" / "last").exists()


def test_a_relative_path_is_stored_absolute_and_a_resume_does_not_load_it_again(tmp_path, trained, monkeypatch,
                                                                                 capsys):
    shutil.copytree(trained / "last", tmp_path / "init")
    monkeypatch.chdir(tmp_path)
    argv = ["train", str(HERE / "tiny_train.yaml"), "--out", "run", "--set", "train.sample_every=0",
            "--set", "train.ckpt_every=2", "--set", "train.init_from=init"]
    assert main([*argv, "--steps", "2"]) == 0
    assert ckpt.read_config(tmp_path / "run" / "last")["train"]["init_from"] == str(tmp_path / "init")
    after_two = load_weights(tmp_path / "run" / "last" / "model.safetensors")
    shutil.rmtree(tmp_path / "init")  # a resume continues its own weights and never reads the init again
    capsys.readouterr()
    trainer = Trainer(zoo.load_recipe(HERE / "tiny_train.yaml", [*SMALL, "train.init_from=init"]), tmp_path / "run",
                      resume=tmp_path / "run", log=QUIET)
    assert trainer.step == 2
    _assert_state(trainer.model, after_two)


def test_the_refused_no_weight_decay_1d_change_names_init_from_and_it_works(tmp_path, trained, capsys):
    argv = ["train", str(HERE / "tiny_train.yaml"), "--set", "train.sample_every=0", "--steps", "1",
            "--set", "train.no_weight_decay_1d=true"]
    assert main([*argv, "--out", str(tmp_path / "a"), "--resume", str(trained)]) == 2
    err = capsys.readouterr().err
    assert f"start a new run from its weights with --set train.init_from={trained / 'last'}" in err
    assert main([*argv, "--out", str(tmp_path / "b"), "--set", f"train.init_from={trained / 'last'}"]) == 0


def test_weights_holding_nan_are_refused_naming_the_tensor(tmp_path, trained, capsys):
    """A NaN written into a checkpoint after it was saved (zoo never saves one) started a run that stopped
    at step 1 blaming its learning rate, and `zoo export diffusers` exported it with exit 0."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    for name in ("ema.safetensors", "model.safetensors"):
        state = load_weights(run / "last" / name)
        state["final_layer.linear.weight"][0, 0] = float("nan")  # same size: the seal's byte counts still hold
        save_weights(run / "last" / name, state)
    said = "ema.safetensors: tensor final_layer.linear.weight holds NaN or inf values"
    with pytest.raises(zoo.errors.UserError, match=said):
        zoo.from_checkpoint(run)
    argv = ["train", str(HERE / "tiny_train.yaml"), *[a for s in SMALL for a in ("--set", s)], "--steps", "1"]
    for extra in (["--out", str(tmp_path / "a"), "--set", f"train.init_from={run}"], ["--out", str(run), "--resume", str(run)]):
        assert main([*argv, *extra]) == 2
        assert said.replace("ema.", "model." if "--resume" in extra else "ema.") in capsys.readouterr().err
    assert main(["export", "diffusers", str(run), "--out", str(tmp_path / "hf")]) == 2
    assert said in capsys.readouterr().err and not (tmp_path / "hf").exists()


def test_a_non_finite_loss_before_the_first_update_of_a_fine_tune_points_at_init_from(tmp_path, trained):
    """Before its first update a run started from train.init_from has that checkpoint's weights: the advice is
    to check them, not the model and diffusion sections (nor train.lr, which acts only on updates)."""
    from zoo.training.loop import NonFiniteError

    trainer = Trainer(_recipe(f"train.init_from={trained / 'last'}"), tmp_path / "run", log=QUIET)
    x, y = next(trainer.batches)
    with pytest.raises(NonFiniteError, match="the loss is not finite at step 1") as caught:
        trainer.train_step(x * float("inf"), y)
    assert str(caught.value).endswith("(no checkpoint was written). Check train.init_from's weights (no update was "
                                      "made yet: train.lr and train.grad_clip act only on updates)")
