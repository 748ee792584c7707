"""Reading a checkpoint a running ``zoo train`` is changing: its ``last/`` replaced by each save, its older
``step_*`` deleted (``train.keep_last``). A read sees the files of one save, or says the checkpoint went."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import zoo.checkpoint as ckpt
import zoo.training.resume
from zoo.errors import UserError
from zoo.sample import model_for, sample_recipe
from zoo.training import Trainer

from tiny_run import QUIET, plain_recipe

pytestmark = pytest.mark.usefixtures("one_thread")


def _saved(out: Path, step: int) -> Trainer:
    """A run whose last/ and step_{step}/ hold a checkpoint at ``step`` (weights that differ per step)."""
    trainer = Trainer(plain_recipe(), out, log=QUIET)
    out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.fill_(step / 10)
    trainer.step = step
    trainer.save(also_step_dir=True)
    return trainer


@pytest.mark.parametrize("relative", [False, True])
def test_a_step_pruned_after_its_recipe_was_read_is_not_sampled_with_fresh_weights(tmp_path, monkeypatch, relative):
    """keep_last deleted step_* between zoo sample reading its recipe and its weights: the path was then no
    directory, so it was taken for a recipe and a freshly initialised model sampled noise, exit 0."""
    _saved(tmp_path / "run", 2)
    step = tmp_path / "run" / "step_0000002"
    monkeypatch.chdir(tmp_path)
    source = Path("run/step_0000002") if relative else step
    recipe = sample_recipe(source)
    shutil.rmtree(step)
    with pytest.raises(UserError, match=r"step_0000002 was deleted while it was being read") as err:
        model_for(source, recipe)
    assert "train.keep_last" in err.value.suggestion


def test_a_recipe_source_still_samples_fresh_weights():
    """The other side of the rule above: a recipe file or a shipped recipe's name is a recipe."""
    recipe = sample_recipe("dit_s_2", ["model.depth=1"])
    _, origin = model_for("dit_s_2", recipe, device="meta")
    assert origin.startswith("NO weights")


def test_a_resume_from_a_checkpoint_replaced_while_read_loads_one_save(tmp_path, monkeypatch):
    """zoo train --resume LIVE/last --out NEW: the live run's next save landed between the reads, and the
    resume went on with step 3's weights beside step 2's trainer state (step and moments), silently."""
    _saved(tmp_path / "live", 2)
    last = tmp_path / "live" / "last"
    _saved(tmp_path / "live", 3)  # last/ is step 3 now; step_0000002/ stays
    real, calls = ckpt.load_trainer_state, []

    def a_save_lands_first(directory, *args, **kwargs):
        calls.append(directory)
        if len(calls) == 1:  # the weights were read: last/ is replaced (here by step 2's save) before the state
            shutil.move(str(last), str(tmp_path / "old"))
            shutil.copytree(tmp_path / "live" / "step_0000002", last)
        return real(directory, *args, **kwargs)

    monkeypatch.setattr(zoo.training.resume, "load_trainer_state", a_save_lands_first)
    resumed = Trainer(plain_recipe(), tmp_path / "new", resume=last, log=QUIET)
    assert len(calls) == 2 and resumed.step == 2
    assert all(torch.all(p == torch.tensor(0.2)) for p in resumed.model.parameters())  # step 2's weights too


def test_a_checkpoint_replaced_at_every_read_is_refused(tmp_path, monkeypatch):
    """A read that never sees one save is refused on one line, not half loaded."""
    _saved(tmp_path / "live", 2)
    last = tmp_path / "live" / "last"
    real = ckpt.load_trainer_state

    def always_a_save(directory, *args, **kwargs):
        state = real(directory, *args, **kwargs)
        stamp = last / ckpt.MODEL
        stamp.write_bytes(stamp.read_bytes())  # a new file of the same weights: another save's
        return state

    monkeypatch.setattr(zoo.training.resume, "load_trainer_state", always_a_save)
    with pytest.raises(UserError, match=r"replaced by a newer save each of 3 times it was read"):
        Trainer(plain_recipe(), tmp_path / "new", resume=last, log=QUIET)


def _two_file_checkpoint(directory: Path) -> Path:
    directory.mkdir(parents=True)
    for name in (ckpt.CONFIG, ckpt.MODEL):
        (directory / name).write_text("a")
    return directory


def test_a_read_that_failed_because_a_save_replaced_the_files_is_done_again(tmp_path):
    """A read that fails on half of two saves (a save landed in between) is read again and gives the new save's
    value: it was raised as if the checkpoint were broken."""
    last, calls = _two_file_checkpoint(tmp_path / "last"), []

    def read():
        calls.append(1)
        if len(calls) == 1:
            (last / ckpt.MODEL).unlink()
            (last / ckpt.MODEL).write_text("bb")  # the next save's weights file
            raise UserError("checkpoint last is incomplete")
        return "read again"

    assert ckpt.read_whole(last, read) == "read again" and len(calls) == 2


def test_a_read_while_the_directory_is_between_a_saves_two_renames_waits_and_reads_again(tmp_path, monkeypatch):
    """A save replacing last/ renames the old one away before it renames the new one in: a read that found no
    last/ then waits and reads again, rather than saying at once that the checkpoint was deleted."""
    import time

    last, calls = _two_file_checkpoint(tmp_path / "last"), []

    def read():
        calls.append(1)
        if len(calls) == 1:
            last.rename(tmp_path / "old")  # the save's first rename
            raise UserError("checkpoint last is missing")
        return "read again"

    waits = []
    monkeypatch.setattr(time, "sleep", lambda s: (waits.append(s), (tmp_path / "old").rename(last)))  # the second
    assert ckpt.read_whole(last, read) == "read again" and len(calls) == 2 and len(waits) == 1


def test_an_init_from_step_pruned_while_its_weights_are_read_says_it_was_deleted(tmp_path, monkeypatch):
    """train.init_from naming a live run's step_* that keep_last prunes after its config was read: the error was
    whatever the half-gone directory raised, not that the checkpoint was deleted while it was read."""
    _saved(tmp_path / "live", 2)
    step = tmp_path / "live" / "step_0000002"
    real = ckpt.checkpoint_weights

    def pruned_first(directory, *args, **kwargs):
        shutil.rmtree(step)
        return real(directory, *args, **kwargs)

    monkeypatch.setattr(ckpt, "checkpoint_weights", pruned_first)
    with pytest.raises(UserError, match=r"step_0000002 was deleted while it was being read"):
        Trainer(plain_recipe(f"train.init_from={step}"), tmp_path / "new", log=QUIET)


def test_a_resume_read_again_says_its_allowed_recipe_change_once(tmp_path, monkeypatch):
    """--allow-recipe-change notes the changed sections on each read of the checkpoint: a resume that read
    last/ again (a save landed meanwhile) said the note twice."""
    _saved(tmp_path / "live", 2)
    last = tmp_path / "live" / "last"
    real, calls = ckpt.load_trainer_state, []

    def a_save_lands_first(directory, *args, **kwargs):
        calls.append(directory)
        if len(calls) == 1:
            shutil.move(str(last), str(tmp_path / "old"))
            shutil.copytree(tmp_path / "live" / "step_0000002", last)
        return real(directory, *args, **kwargs)

    monkeypatch.setattr(zoo.training.resume, "load_trainer_state", a_save_lands_first)
    resumed = Trainer(plain_recipe("diffusion.min_snr_gamma=5.0"), tmp_path / "new", resume=last, log=QUIET,
                      allow_recipe_change=True)
    assert len(calls) == 2
    notes = [line for line in resumed.after_banner if "--allow-recipe-change" in line]
    assert len(notes) == 1 and "diffusion.min_snr_gamma" in notes[0], resumed.after_banner
