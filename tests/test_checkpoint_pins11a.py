"""Pins on zoo.checkpoint that mutation testing (round 11a) found unheld: a save never replaces a symlink;
an EMA file of parameters only takes its buffers from model.safetensors; NaN/inf in the EMA or raw weights is
refused naming the file; the retired-key note is said once per checkpoint; a recipe without a model section
or of another checkpoint format is refused; weights saved in another dtype load in the model's; a model with
non-persistent buffers is not left on meta; step 0 is step 0; a save cut off between its renames is repaired
by every reader and by checkpoint_of; log.jsonl marks a run directory. Each was a one-line change to
zoo/checkpoint.py that the suite let through; the tests use a one-block DiT and run in about a second."""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

from zoo import checkpoint as ckpt
from zoo.errors import UserError
from zoo.weights import build_with_state, save_weights

pytestmark = pytest.mark.usefixtures("one_thread")

RECIPE = {
    "model": {"type": "dit", "input_size": 8, "patch_size": 2, "in_channels": 4, "hidden_size": 32,
              "depth": 1, "num_heads": 2, "num_classes": 10},
}  # fmt: skip


def _model() -> nn.Module:
    import zoo

    torch.manual_seed(0)
    model = zoo.build_model(RECIPE)
    for p in model.parameters():
        nn.init.normal_(p, std=0.05)
    return model


def test_a_symlink_to_a_checkpoint_is_not_replaced(tmp_path):
    """A save onto a symlink (to a zoo checkpoint, even) is refused: replacing it swapped the user's link
    for a directory, and the checkpoint it pointed at silently stopped being the one the link named."""
    real = ckpt.save_checkpoint(tmp_path / "real", _model(), RECIPE)
    before = (real / ckpt.MODEL).read_bytes()
    link = tmp_path / "link"
    os.symlink(real, link)
    with pytest.raises(UserError, match="exists and is not a directory"):
        ckpt.save_checkpoint(link, _model(), RECIPE)
    assert link.is_symlink() and (real / ckpt.MODEL).read_bytes() == before


class _Normed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.norm = nn.BatchNorm1d(3)  # running_mean / running_var / num_batches_tracked: buffers


def test_an_ema_of_parameters_only_takes_the_buffers_of_model_safetensors(tmp_path):
    """EMA tracks parameters; the buffers (running statistics) come from model.safetensors. A loader that
    took the EMA file alone missed every buffer (a strict-load error), one that took the model's parameters
    over the EMA's sampled with the raw weights."""
    model = _Normed()
    with torch.no_grad():
        model.norm.running_mean.fill_(0.25)
        model.norm.running_var.fill_(3.0)
    params = {k for k, _ in model.named_parameters()}
    ema = {k: v + 1.0 for k, v in model.state_dict().items() if k in params}
    save_weights(tmp_path / ckpt.MODEL, model.state_dict())
    save_weights(tmp_path / ckpt.EMA, ema)
    state, source = ckpt.checkpoint_weights(tmp_path, "ema", params)
    assert source == tmp_path / ckpt.EMA
    assert set(state) == set(model.state_dict())
    for k, v in model.state_dict().items():
        assert torch.equal(state[k], ema[k] if k in params else v), k
    # an EMA file that holds buffers too is taken whole (its own buffers, not the model's)
    whole = {k: v + 2.0 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    save_weights(tmp_path / ckpt.EMA, whole)
    state, _ = ckpt.checkpoint_weights(tmp_path, "ema", params)
    assert all(torch.equal(state[k], whole[k]) for k in whole)


def test_non_finite_ema_weights_are_refused_naming_the_ema_file(tmp_path):
    """zoo sample prefers EMA weights: a NaN there (a file changed after its save) sampled black images
    without a word when only model.safetensors was checked."""
    model, ema = _model(), _model()
    with torch.no_grad():
        ema.final_layer.linear.bias[0] = float("nan")
    ckpt.save_checkpoint(tmp_path / "c", model, RECIPE, ema=ema)
    loaded, _ = ckpt.load_checkpoint(tmp_path / "c", weights="model")  # the raw weights are fine
    with pytest.raises(UserError, match=r"ema\.safetensors: tensor final_layer\.linear\.bias holds NaN or inf"):
        ckpt.load_checkpoint(tmp_path / "c", weights="ema")


def test_non_finite_raw_weights_are_refused_naming_the_model_file(tmp_path):
    """A NaN in model.safetensors (--weights raw, or a checkpoint without EMA) is one line naming the file
    and tensor, not black samples or a run that stops at step 1 blaming its learning rate."""
    model = _model()
    with torch.no_grad():
        model.x_embedder.proj.bias[1] = float("inf")
    ckpt.save_checkpoint(tmp_path / "c", model, RECIPE)
    with pytest.raises(UserError, match=r"model\.safetensors: tensor x_embedder\.proj\.bias holds NaN or inf"):
        ckpt.load_checkpoint(tmp_path / "c")


def _with_recipe(out, change) -> None:
    """Rewrite a checkpoint's recorded recipe (config.json lists the other files' sizes, not its own)."""
    payload = json.loads((out / ckpt.CONFIG).read_text())
    change(payload["recipe"])
    (out / ckpt.CONFIG).write_text(json.dumps(payload))


def test_a_retired_key_is_noted_once_per_checkpoint_not_per_read(tmp_path, capsys):
    """zoo eval and zoo compare read a checkpoint's recipe several times: the note on a retired key is said
    once per checkpoint, not once per read (a screen of repeated notes buries the results)."""
    out = ckpt.save_checkpoint(tmp_path / "c", _model(), RECIPE)
    _with_recipe(out, lambda r: r.update(data={"name": "mine", "dataset": "synthetic"}))
    for _ in range(3):
        assert ckpt.load_recipe_of(out)["data"] == {"dataset": "synthetic"}
    assert capsys.readouterr().err.count("data.name ignored") == 1


def test_a_checkpoint_recipe_without_a_model_section_is_refused_naming_its_config(tmp_path):
    """A checkpoint's recipe must describe its model: one without it (edited by hand) is one line naming
    config.json and what to restore, not an error from deep inside the model build."""
    out = ckpt.save_checkpoint(tmp_path / "c", _model(), RECIPE)
    _with_recipe(out, lambda r: r.pop("model"))
    with pytest.raises(UserError, match=r"config\.json: its recipe has no model section"):
        ckpt.load_checkpoint(out)


def test_weights_saved_in_another_dtype_load_in_the_models_dtype(tmp_path):
    """A checkpoint written in float16 or float64 (an export, a parity run) loads into the model the recipe
    builds, float32: assigning the saved tensors as they were left a half-precision model on the CPU."""
    model = _model()
    for dtype in (torch.float16, torch.float64):
        out = ckpt.save_checkpoint(tmp_path / str(dtype), {k: v.to(dtype) for k, v in model.state_dict().items()},
                                   RECIPE)
        loaded, _ = ckpt.load_checkpoint(out)
        assert {p.dtype for p in loaded.parameters()} == {torch.float32}, dtype
        w = loaded.blocks[0].attn.qkv.weight
        assert torch.equal(w, model.blocks[0].attn.qkv.weight.to(dtype).float())


class _Tabled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("freqs", torch.arange(4.0) + 1.0, persistent=False)  # in no state dict

    def forward(self, x):
        return self.lin(x) * self.freqs


def test_a_model_with_non_persistent_buffers_is_built_for_real_not_on_meta():
    """build_with_state builds on the meta device and assigns the loaded tensors: a buffer in no state dict
    (a frequency table) would stay on meta, and the first forward failed; such models are built normally."""
    src = _Tabled()
    model = build_with_state(_Tabled, src.state_dict())
    assert not model.freqs.is_meta and torch.equal(model.freqs, torch.arange(4.0) + 1.0)
    assert torch.equal(model.lin.weight, src.lin.weight)
    x = torch.ones(2, 4)
    assert torch.equal(model(x), src(x))


def test_a_step_0_checkpoint_reports_step_0(tmp_path):
    """trained_step reads a checkpoint's step for run summaries: step 0 (a run saved before its first
    update, train.ckpt_every at the start) is step 0, not 'unknown' (which fell back to the log's newest)."""
    for step in (0, 7):
        out = ckpt.save_checkpoint(tmp_path / f"s{step}", _model(), RECIPE, state={"step": step})
        assert ckpt.trained_step(out) == step
    assert ckpt.trained_step(ckpt.save_checkpoint(tmp_path / "none", _model(), RECIPE)) is None
    assert ckpt.trained_step(ckpt.save_checkpoint(tmp_path / "neg", _model(), RECIPE, state={"step": -1})) is None


def _cut_between_renames(tmp_path, monkeypatch):
    """A run whose save of step 2 over last/ was killed between its two renames (last/ set aside, the sealed
    new copy not yet in place): a copy of the run directory taken at that instant."""
    import shutil

    from zoo import atomic

    run, snap = tmp_path / "run", tmp_path / "snap"
    ckpt.save_checkpoint(run / "last", _model(), RECIPE, state={"step": 1})

    def stop_here(step, path):
        if step == "install":
            shutil.copytree(run, snap)  # what a SIGKILL here leaves
            raise RuntimeError("killed")

    monkeypatch.setattr(atomic, "_reached", stop_here)
    with pytest.raises(RuntimeError, match="killed"):
        ckpt.save_checkpoint(run / "last", _model(), RECIPE, state={"step": 2})
    monkeypatch.undo()
    assert not (snap / "last").exists()
    return snap


def test_reading_a_checkpoint_whose_save_was_cut_off_sealed_finishes_that_save(tmp_path, monkeypatch):
    """Such a run has no last/ at all: every reader (load_trainer_state, read_config, load_checkpoint)
    repairs first and reads the new copy, where one that did not said 'checkpoint directory .../last does
    not exist'."""
    snap = _cut_between_renames(tmp_path, monkeypatch)
    assert ckpt.load_trainer_state(snap / "last")["step"] == 2
    assert sorted(p.name for p in snap.iterdir()) == ["last"]


def test_a_run_directory_whose_last_save_was_cut_off_resolves_to_last(tmp_path, monkeypatch):
    """zoo sample RUN / zoo eval RUN read RUN/last: checkpoint_of repairs last/ first, so a run killed between
    the renames still resolves to last/ (step 2), not to the run directory ('RUN is not a zoo checkpoint')."""
    snap = _cut_between_renames(tmp_path, monkeypatch)
    assert ckpt.checkpoint_of(snap) == snap / "last"
    assert ckpt.load_trainer_state(ckpt.checkpoint_of(snap))["step"] == 2


def test_a_config_of_another_checkpoint_format_is_refused(tmp_path):
    """config.json names its format: a checkpoint of another format (a later zoo's, or a foreign tool's JSON
    with a recipe key) is refused by name, not read as this format's recipe and weights."""
    out = ckpt.save_checkpoint(tmp_path / "c", _model(), RECIPE)
    payload = json.loads((out / ckpt.CONFIG).read_text())
    payload["format"] = "zoo-checkpoint/2"
    (out / ckpt.CONFIG).write_text(json.dumps(payload))
    with pytest.raises(UserError, match=r"config\.json is not a zoo-checkpoint/1 config"):
        ckpt.read_config(out)


def test_a_directory_with_a_training_log_is_a_run_even_before_its_first_last(tmp_path):
    """run_of finds a checkpoint's zoo train run by last/ or by log.jsonl (a run killed before its first
    save of last/, whose step_* checkpoints exist); zoo eval and zoo train --resume read the run from it."""
    step = ckpt.save_checkpoint(tmp_path / "run" / "step_0000010", _model(), RECIPE, state={"step": 10})
    assert ckpt.run_of(step) is None
    (tmp_path / "run" / "log.jsonl").write_text('{"step": 10}\n')
    assert ckpt.run_of(step) == tmp_path / "run"
