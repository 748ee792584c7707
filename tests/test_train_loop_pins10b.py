"""Pins for what one ``zoo train`` step and run do (zoo/training/loop.py) that a round of mutation testing
could change with no test failing: the refusal of a global batch that grad_accum does not divide, the
global sample index each micro-batch draws from, the stop on a non-finite gradient with a finite loss,
the EMA update after each step, the mean loss of a log window, the note on fewer data classes, and the
startup refusal of a ``step_*`` the final save would write over. Each test names the wrong behaviour."""

from __future__ import annotations

import pytest
import torch

from zoo.errors import UserError
from zoo.training import Trainer, train

from tiny_run import QUIET, plain_recipe

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_batch_size_grad_accum_does_not_divide_is_refused():
    """batch_size 6 over grad_accum 4 is micro-batches of 6 // 4 = 1: without the refusal a step trains on
    4 of its 6 samples, silently, and the logged global batch is not the one trained."""
    with pytest.raises(UserError, match="train.batch_size 6 is not divisible by 1 processes x train.grad_accum 4"):
        Trainer(plain_recipe("train.batch_size=6", "train.grad_accum=4"), "unused-out", log=QUIET)


def test_each_micro_batch_draws_from_its_global_sample_indices(tmp_path, monkeypatch):
    """Sample p of step k draws from generator (seed, k * batch_size + p): a loop indexing by the step alone
    gives step 1 the draws (time, noise, label drop, flip) of step 0's samples shifted by one, so steps
    reuse each other's noise and a resume no longer draws what the uninterrupted run would."""
    import zoo.training.loop as loop

    seen = []
    real = loop.draw

    def recording(indices, *args, **kwargs):
        seen.append(list(indices))
        return real(indices, *args, **kwargs)

    monkeypatch.setattr(loop, "draw", recording)
    trainer = Trainer(plain_recipe("train.grad_accum=2"), tmp_path, log=QUIET)
    for _ in range(2):
        x, y = next(trainer.batches)
        trainer.train_step(x, y)
        trainer.step += 1
    assert seen == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_a_non_finite_gradient_with_a_finite_loss_stops_before_the_weights_change(tmp_path):
    """A finite loss whose gradient is inf (an overflow in backward) stops the step: checking the loss
    alone lets AdamW write NaN into every weight it touches, and the run goes on training NaNs."""
    from zoo.training.loop import NonFiniteError

    trainer = Trainer(plain_recipe(), tmp_path, log=QUIET)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    first = next(p for p in trainer.model.parameters() if p.requires_grad)
    first.register_hook(lambda g: torch.full_like(g, float("inf")))
    x, y = next(trainer.batches)
    with pytest.raises(NonFiniteError, match="the gradient norm is not finite at step 1"):
        trainer.train_step(x, y)
    for n, p in trainer.model.named_parameters():
        assert torch.equal(p.detach(), before[n]), n


def test_each_step_updates_the_ema_toward_the_new_weights(tmp_path):
    """After a step the EMA is d * (its value before) + (1 - d) * (the updated weights): a step that leaves
    the EMA out keeps it at the initial weights, and every grid, FD and released checkpoint is untrained."""
    trainer = Trainer(plain_recipe("train.ema_decay=0.5", "train.lr=0.05"), tmp_path, log=QUIET)
    before = {n: s.clone() for n, s in trainer.ema.state_dict().items()}
    x, y = next(trainer.batches)
    trainer.train_step(x, y)
    params = dict(trainer.model.named_parameters())
    moved = 0
    for n, shadow in trainer.ema.state_dict().items():
        expected = 0.5 * before[n].double() + 0.5 * params[n].detach().double()
        torch.testing.assert_close(shadow.double(), expected, rtol=1e-6, atol=1e-7, msg=n)
        moved += int(not torch.equal(shadow, before[n]))
    assert moved > 0


class _NoMonitor:
    """A Monitor that writes nothing (log.jsonl, loss.png and TensorBoard are pinned elsewhere)."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def test_a_log_record_holds_the_mean_loss_of_its_window(tmp_path, monkeypatch):
    """log_every 2: the record of steps 1-2 is the mean of their losses; a sum doubles the logged loss
    (and curves of runs logged at different log_every no longer compare). A window without skipped steps
    has no skipped_steps key."""
    real = Trainer.train_step

    def fixed(self, x, y, *args, **kwargs):
        real(self, x, y, *args, **kwargs)
        return torch.tensor(float(self.step + 1))  # step 1's loss 1.0, step 2's loss 2.0

    monkeypatch.setattr(Trainer, "train_step", fixed)
    monkeypatch.setattr("zoo.training.monitor.Monitor", _NoMonitor)  # the records alone: no TensorBoard import
    records = train(plain_recipe("train.log_every=2"), tmp_path, steps=2, log=QUIET)
    assert [(r["step"], r["loss"]) for r in records] == [(2, 1.5)]
    assert "skipped_steps" not in records[0]  # only where the fp16 scaler skipped steps: not 0 in every record


def test_data_with_as_many_classes_as_the_model_gets_no_never_trained_note(tmp_path):
    """The note 'labels N..M are never trained' is for data of fewer classes than the model: an image folder
    of as many classes said 'the data has 4 classes and the model 4: labels 4..3 are never trained'."""
    from PIL import Image

    for c in range(4):
        (tmp_path / "img" / f"c{c}").mkdir(parents=True)
        Image.new("RGB", (8, 8), (60 * c, 20, 30)).save(tmp_path / "img" / f"c{c}" / "0.png")
    trainer = Trainer(plain_recipe("data.dataset=image_folder", f"data.root={tmp_path / 'img'}"), tmp_path / "run",
                      log=QUIET)
    assert trainer.classes == ["c0", "c1", "c2", "c3"]
    assert not [line for line in trainer.after_banner if "never trained" in line], trainer.after_banner


def test_a_step_dir_at_the_final_step_holding_a_users_file_is_refused_before_training(tmp_path, monkeypatch):
    """The run's last step is saved as step_* too (ckpt_every 2, steps 3: step_0000003). A file of the user's
    there was found only by that save, after the steps trained (and on Ctrl-C too); it is refused at startup."""
    out = tmp_path / "run"
    train(plain_recipe("train.ckpt_every=2"), out, steps=2, log=QUIET)
    (out / "step_0000003").mkdir()
    (out / "step_0000003" / "notes.txt").write_text("mine")
    trained = []
    real = Trainer.train_step
    monkeypatch.setattr(Trainer, "train_step", lambda self, *a, **k: trained.append(self.step) or real(self, *a, **k))
    with pytest.raises(UserError, match="step_0000003"):
        train(plain_recipe("train.ckpt_every=2"), out, steps=3, resume=out, log=QUIET)
    assert trained == [] and (out / "step_0000003" / "notes.txt").read_text() == "mine"


def test_a_second_run_call_continues_the_runs_own_checkpoints(tmp_path):
    """Trainer.run may be called again to go on (run(2), then run(4)): the second call found its own last/
    and refused the directory as 'a run that ended while this one started'."""
    trainer = Trainer(plain_recipe("train.log_every=1"), tmp_path / "run", log=QUIET)
    try:
        assert [r["step"] for r in trainer.run(2)] == [1, 2]
        assert [r["step"] for r in trainer.run(4)] == [3, 4]
    finally:
        trainer.close()
    assert torch.load(tmp_path / "run" / "last" / "trainer_state.pt", weights_only=True)["step"] == 4
