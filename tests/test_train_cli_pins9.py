"""Pins on ``zoo train``'s argument checks that run before any step (``zoo/commands/train.py``): ``--steps 0``
is a run that saves its initial weights, ``--steps`` may equal a decaying schedule's ``train.steps``, a
dataset name given as ``train.eval_ref`` is not turned into a path, and a resume onto another dataset
does not carry the old run's ``data.root`` over. Each is called directly (no step is trained), so the
checks cost milliseconds."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from zoo.checkpoint import save_checkpoint
from zoo.commands.train import _absolute_paths, _checked_arguments, _paths_of_the_resumed_run
from zoo.errors import UserError

RECIPE = Path(__file__).parent / "recipes" / "tiny_train.yaml"  # train.steps 30


def _args(tmp_path: Path, *overrides: str, steps: int | None = None) -> argparse.Namespace:
    return argparse.Namespace(recipe=str(RECIPE), out=str(tmp_path / "run"), overrides=list(overrides), resume=None,
                              allow_recipe_change=False, device="cpu", steps=steps)


def test_steps_0_is_accepted_it_saves_the_initial_weights(tmp_path, monkeypatch):
    """``--steps 0`` writes step_0000000/ (the initial weights, to evaluate or compare against): a check of
    ``--steps < 1`` refused it, against the documented ``--steps must be >= 0``."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    out, recipe, device, notes = _checked_arguments(_args(tmp_path, steps=0))
    assert Path(out) == tmp_path / "run" and device == "cpu" and recipe["train"]["steps"] == 30 and notes == []
    with pytest.raises(UserError, match=r"--steps must be >= 0 and at most 1,000,000,000 \(as train.steps\), got -1"):
        _checked_arguments(_args(tmp_path, steps=-1))
    _checked_arguments(_args(tmp_path, steps=10**9))  # a constant schedule: any step up to train.steps' bound
    with pytest.raises(UserError, match=r"--steps must be .* got 1000000001"):  # it trained 'forever'
        _checked_arguments(_args(tmp_path, steps=10**9 + 1))


def test_steps_equal_to_a_cosine_schedules_train_steps_is_not_past_it(tmp_path, monkeypatch):
    """``--steps N`` with ``train.steps N`` runs the whole decay; ``>=`` in place of ``>`` refused the
    plainest spelling of a full run, while one step more must still be refused."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cosine = "train.lr_schedule=cosine"
    _checked_arguments(_args(tmp_path, cosine, steps=30))
    with pytest.raises(UserError, match=r"--steps 31 is past train.steps 30, where the cosine decay ends"):
        _checked_arguments(_args(tmp_path, cosine, steps=31))


def test_eval_ref_naming_a_dataset_stays_a_name_while_relative_paths_become_absolute(tmp_path, monkeypatch):
    """``train.eval_ref: emoji32`` names a dataset: made absolute (``/cwd/emoji32``) it became a path that does
    not exist, and the run's FD reference failed. A relative eval_ref that is a file, and data.root, are
    made absolute (config.json must name the same files wherever zoo eval or --resume runs)."""
    monkeypatch.chdir(tmp_path)
    recipe = {"data": {"root": "latents"}, "train": {"eval_ref": "emoji32"}}
    _absolute_paths(recipe)
    assert recipe == {"data": {"root": str(tmp_path / "latents")}, "train": {"eval_ref": "emoji32"}}
    (tmp_path / "ref.npz").write_bytes(b"")
    recipe = {"train": {"eval_ref": "ref.npz"}}
    _absolute_paths(recipe)
    assert recipe["train"]["eval_ref"] == str(tmp_path / "ref.npz")


def test_a_resume_onto_another_dataset_does_not_take_the_old_data_root(tmp_path):
    """A resume that names another dataset (``--set data.dataset=synthetic``, with ``--allow-recipe-change``:
    without it, it is refused) must not inherit the checkpoint's image-folder ``data.root`` (synthetic then
    refused 'data.root is set', or another dataset read the wrong folder); train.eval_ref, which is not data,
    is still taken over with its note."""
    save_checkpoint(tmp_path / "ck", {"w": torch.zeros(1)},
                    {"data": {"dataset": "image_folder", "root": "/old/img"}, "train": {"eval_ref": "/refs/r.npz"}})
    recipe = {"data": {"dataset": "synthetic"}}
    with pytest.raises(UserError, match="trained on data.dataset 'image_folder'.*this recipe's is 'synthetic'"):
        _paths_of_the_resumed_run(recipe, str(tmp_path / "ck"))
    notes = _paths_of_the_resumed_run(recipe, str(tmp_path / "ck"), allow_recipe_change=True)
    assert recipe == {"data": {"dataset": "synthetic"}, "train": {"eval_ref": "/refs/r.npz"}}
    assert notes == ["zoo train: note: --allow-recipe-change: the checkpoint trained on data.dataset 'image_folder' "
                     "(data.root /old/img); the run goes on with 'synthetic', its images and labels",
                     "zoo train: note: train.eval_ref is the checkpoint's, /refs/r.npz (--set train.eval_ref=... "
                     "to read another)"]


@pytest.mark.parametrize("then, now", [({"size": 8}, {"dataset": "synthetic", "size": 8}),
                                       ({"dataset": "synthetic", "size": 8}, {"size": 8})],
                         ids=["checkpoint-default", "recipe-default"])
def test_a_dataset_left_to_its_default_on_one_side_is_the_same_dataset(tmp_path, then, now):
    """A data section naming no dataset trains on the default, synthetic: a checkpoint that left it out,
    resumed by a recipe that spells it (or the reverse), is the same data, not refused as another."""
    save_checkpoint(tmp_path / "ck", {"w": torch.zeros(1)}, {"model": {"type": "dit"}, "data": then})
    recipe = {"model": {"type": "dit"}, "data": dict(now)}
    assert _paths_of_the_resumed_run(recipe, str(tmp_path / "ck")) == []
    assert recipe == {"model": {"type": "dit"}, "data": now}


def test_a_refused_resume_from_a_default_dataset_names_it_in_the_fix(tmp_path):
    """A first start whose recipe named no dataset trained on the default, synthetic; a resume onto another
    dataset is refused with the ``--set`` that resumes it. Built from the checkpoint's keys only, the fix
    read 'give the first start's --set options again: , or ...' (nothing to give)."""
    save_checkpoint(tmp_path / "ck", {"w": torch.zeros(1)}, {"model": {"type": "dit"}, "data": {"size": 8}})
    with pytest.raises(UserError) as refused:
        _paths_of_the_resumed_run({"data": {"dataset": "emoji32"}}, str(tmp_path / "ck"))
    assert "trained on data.dataset 'synthetic', and this recipe's is 'emoji32'" in str(refused.value)
    assert refused.value.suggestion.startswith("give the first start's --set options again: --set "
                                               "data.dataset=synthetic, or pass --allow-recipe-change")
    assert _paths_of_the_resumed_run({"data": {"dataset": "synthetic"}}, str(tmp_path / "ck")) == []
