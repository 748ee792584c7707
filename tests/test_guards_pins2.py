"""Pins on zoo.guards that no other test held: the last CUDA index, a Windows-style path never taken for a
shipped recipe's name, outputs inside a checkpoint seen from a working directory within it (and not allowed
by ``itself``), a run directory with validation records or a user's FD reference, and resuming a run
through a relative --out."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import zoo
from zoo.checkpoint import save_checkpoint
from zoo.errors import UserError
from zoo.guards import check_outside_checkpoints, check_run_dir, resolve_device, resolve_sample_source

TRAIN = Path(__file__).parent / "recipes" / "tiny_train.yaml"


def _checkpoint(path: Path) -> Path:
    """A real zoo checkpoint of the tiny training DiT at ``path``."""
    recipe = zoo.load_recipe(str(TRAIN))
    save_checkpoint(path, zoo.build_model(recipe), recipe)
    return path


def test_a_cuda_index_equal_to_the_device_count_is_refused(monkeypatch):
    """cuda:N on an N-GPU machine does not exist (cuda:0..cuda:N-1): an off-by-one let it through to fail later
    in torch with a traceback instead of one line."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(UserError, match=r"--device cuda:2: this machine has 2 CUDA device\(s\) \(cuda:0..cuda:1\)"):
        resolve_device("cuda:2")


def test_a_missing_windows_style_path_is_not_taken_for_a_recipe_name(tmp_path, monkeypatch):
    """'runs\\dit_s_2' is a mistyped path: taken as a bare name it would sample the shipped recipe's random weights
    (or fail as an unknown recipe) instead of saying the path does not exist."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"runs\\dit_s_2 does not exist"):
        resolve_sample_source("runs\\dit_s_2")
    assert resolve_sample_source("dit_s_2") == "dit_s_2"  # a bare name stays a recipe name


def test_a_relative_output_from_a_folder_inside_a_checkpoint_is_refused(tmp_path, monkeypatch):
    """Working inside CKPT/notes, --out grid.png lies inside the checkpoint: only the path's own parents were
    searched ('.', i.e. CKPT/notes), not the working directory's, so the file went into the checkpoint."""
    ckpt = _checkpoint(tmp_path / "ckpt")
    (ckpt / "notes").mkdir()
    monkeypatch.chdir(ckpt / "notes")
    with pytest.raises(UserError, match=f"grid.png is inside the checkpoint directory {ckpt}"):
        check_outside_checkpoints("grid.png")
    monkeypatch.chdir(tmp_path)
    check_outside_checkpoints("grid.png")


def test_itself_allows_the_checkpoint_but_not_a_path_inside_it(tmp_path):
    """convert --force may replace a checkpoint whole (itself=True), but a path inside one is still refused."""
    ckpt = _checkpoint(tmp_path / "ckpt")
    check_outside_checkpoints(ckpt, itself=True)
    with pytest.raises(UserError, match="is inside the checkpoint directory"):
        check_outside_checkpoints(ckpt / "sub", itself=True)
    with pytest.raises(UserError, match="is a checkpoint directory"):
        check_outside_checkpoints(ckpt)


def test_a_run_that_stopped_before_its_first_checkpoint_may_start_again_after_a_validation_record(tmp_path):
    """train.val_every writes {step, val_loss, ...} records without 'loss': read as a user's file, the log refused
    the restart of a run that stopped before its first checkpoint."""
    out = tmp_path / "run"
    out.mkdir()
    records = [{"step": 5, "loss": 1.0}, {"step": 5, "val_loss": 0.9, "val_n": 8}, {"step": 5, "fd": 3.0}]
    (out / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert check_run_dir(out, resuming=False) == out
    (out / "log.jsonl").write_text(json.dumps({"step": 5, "note": "mine"}) + "\n")
    with pytest.raises(UserError, match="holds log.jsonl that zoo train did not write"):
        check_run_dir(out, resuming=False)


def test_an_fd_reference_without_zoos_identity_entry_is_a_users_file(tmp_path):
    """A run would replace eval/fd_reference.npz: one without zoo train's 'identity' entry is a user's reference
    statistics, which any npz counted as zoo's would lose."""
    out = tmp_path / "run"
    (out / "eval").mkdir(parents=True)
    np.savez(out / "eval" / "fd_reference.npz", mu=np.zeros(3), sigma=np.eye(3))
    with pytest.raises(UserError, match="holds eval/fd_reference.npz that zoo train did not write") as info:
        check_run_dir(out, resuming=False)
    assert "move eval/fd_reference.npz away" in info.value.suggestion
    np.savez(out / "eval" / "fd_reference.npz", mu=np.zeros(3), sigma=np.eye(3), identity=np.array("x"))
    assert check_run_dir(out, resuming=False) == out


def test_resuming_a_run_into_itself_through_a_relative_out(tmp_path, monkeypatch):
    """zoo train --out runs/a --resume runs/a/last: the resumed run (resolved, absolute) was compared with the
    relative --out and the run's own checkpoint was called 'another run's'."""
    monkeypatch.chdir(tmp_path)
    _checkpoint(tmp_path / "runs" / "a" / "last")
    _checkpoint(tmp_path / "runs" / "b" / "last")
    assert check_run_dir("runs/a", resuming="runs/a/last") == Path("runs/a")
    assert check_run_dir("runs/a", resuming="runs/a") == Path("runs/a")
    with pytest.raises(UserError, match="is another run's checkpoint"):
        check_run_dir("runs/a", resuming="runs/b/last")


def test_every_file_a_new_run_would_replace_is_named_at_once(tmp_path):
    """Only the first foreign file was named: moving it away as told gave the same error for the next one
    (step_0000002.png after step_0000001.png; loss.png and the grids after a foreign log.jsonl)."""
    from PIL import Image

    out = tmp_path / "run"
    (out / "samples").mkdir(parents=True)
    for step in (1, 2):
        Image.new("RGB", (4, 4)).save(out / "samples" / f"step_000000{step}.png")
    with pytest.raises(UserError) as info:
        check_run_dir(out, resuming=False)
    assert "holds 2 files (samples/step_0000001.png, samples/step_0000002.png) that zoo train did not write; " \
           "the run would replace them" in info.value.message and info.value.suggestion.endswith("move them away")
    (out / "log.jsonl").write_text("my notes\n")
    (out / "loss.png").write_bytes(b"my plot")
    (out / "samples" / "step_0000003.png").write_bytes(b"x")
    with pytest.raises(UserError, match=r"holds 5 files \(log.jsonl, loss.png, samples/step_0000001.png and 2 more\)"):
        check_run_dir(out, resuming=False)
    for name in ("log.jsonl", "loss.png", "samples/step_0000001.png", "samples/step_0000002.png",
                 "samples/step_0000003.png"):  # all of them moved away: the run starts
        (out / name).unlink()
    assert check_run_dir(out, resuming=False) == out
    # a log of zoo's own records (a run stopped before its first checkpoint) beside a grid zoo did not write:
    # the log said 'may start again' and the grid was replaced without a word
    (out / "log.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
    (out / "loss.png").write_bytes(b"its plot")
    Image.new("RGB", (4, 4)).save(out / "samples" / "step_0000002.png")
    with pytest.raises(UserError, match=r"holds samples/step_0000002.png that zoo train did not write"):
        check_run_dir(out, resuming=False)
    (out / "samples" / "step_0000002.png").unlink()
    assert check_run_dir(out, resuming=False) == out
