"""Pins for what ``--resume`` restores and refuses (zoo/training/resume.py) that a round of mutation testing
could change with no test failing: the fp16 gradient scaler's state, a relabelling of the same classes, a
non-finite EMA file, and the branch note naming only steps after the resumed one. Each test names the
wrong behaviour it guards against."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from zoo.errors import UserError
from zoo.training import Trainer
from zoo.training.resume import Resuming
from zoo.weights import load_weights, save_weights

from tiny_run import QUIET, plain_recipe

pytestmark = pytest.mark.usefixtures("one_thread")


def _saved(out: Path, *overrides, step: int = 0, steps_dirs: bool = False) -> Trainer:
    """A run directory whose last/ (and step_*/ when ``steps_dirs``) holds a checkpoint at ``step``."""
    trainer = Trainer(plain_recipe(*overrides), out, log=QUIET)
    out.mkdir(parents=True, exist_ok=True)
    trainer.step = step
    trainer.save(also_step_dir=steps_dirs)
    return trainer


def test_a_resume_restores_the_fp16_gradient_scalers_state(tmp_path):
    """fp16: the loss scale and its growth counter are the checkpoint's. A resume that drops them starts
    again at 65536, so a run that had backed its scale off skips steps to overflow all over again."""
    first = _saved(tmp_path / "run", "train.precision=fp16")
    assert first.scaler.is_enabled()
    first.scaler.load_state_dict({"scale": 1024.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                                  "growth_interval": 2000, "_growth_tracker": 7})
    first.save(also_step_dir=False)
    resumed = Trainer(plain_recipe("train.precision=fp16"), tmp_path / "run", resume=tmp_path / "run", log=QUIET)
    state = resumed.scaler.state_dict()
    assert (state["scale"], state["_growth_tracker"]) == (1024.0, 7)


def test_the_same_classes_in_another_label_order_are_refused():
    """Class names the checkpoint knew, now at other labels (a plugin dataset listing them in another order),
    retarget every class embedding; comparing the names as sets let such a resume through."""
    trainer = SimpleNamespace(classes=["cat", "dog", "fox"], after_banner=[])
    with pytest.raises(UserError, match="dog was label 0, is now 1"):
        Resuming._check_classes(trainer, ["dog", "cat", "fox"], Path("ckpt"), allow_recipe_change=False)
    Resuming._check_classes(trainer, ["dog", "cat", "fox"], Path("ckpt"), allow_recipe_change=True)
    assert len(trainer.after_banner) == 1 and "--allow-recipe-change" in trainer.after_banner[0]


def test_a_resume_refuses_an_ema_file_holding_nan(tmp_path):
    """An ema.safetensors a NaN was written into after the save (zoo never saves one) resumed silently:
    the run trained on, and every grid, FD and released EMA checkpoint was NaN."""
    _saved(tmp_path / "run")
    path = tmp_path / "run" / "last" / "ema.safetensors"
    state = load_weights(path)
    state["final_layer.linear.weight"][0, 0] = float("nan")  # same size: the seal's byte counts still hold
    save_weights(path, state)
    with pytest.raises(UserError, match="ema.safetensors: tensor final_layer.linear.weight holds NaN or inf"):
        Trainer(plain_recipe(), tmp_path / "run", resume=tmp_path / "run", log=QUIET)


def test_the_branch_note_names_only_the_steps_after_the_resumed_one(tmp_path):
    """Resumed at step 2 from a run holding step_0000002 and step_0000004, the note names step_0000004
    alone: the resumed step's own directory is no checkpoint of another branch."""
    out = tmp_path / "run"
    _saved(out, step=4, steps_dirs=True)
    _saved(out, step=2, steps_dirs=True)  # last/ is step 2 now, as after a resume from step_0000002
    resumed = Trainer(plain_recipe(), out, resume=out / "last", log=QUIET)
    said = [line for line in resumed.after_banner if "come after step" in line]
    assert len(said) == 1 and "step_0000004 in" in said[0] and "step_0000002" not in said[0], resumed.after_banner
