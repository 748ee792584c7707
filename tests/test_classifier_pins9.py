"""Pins on ``zoo train-classifier`` (:mod:`zoo.classifier_train`) that mutation testing found unheld: the size of
the seeded holdout of a dataset without a holdout split, the refusal of an empty training split, the warm-up
length, and AdamW's weight decay applied to matrices only.
Tiny 8x8 data and one-block classifiers; a few steps."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from zoo.classifier_train import ClassifierData, load_data, train_classifier
from zoo.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")

RECIPE = Path(__file__).parent / "recipes" / "tiny_train.yaml"  # synthetic 8x8 RGB, 4 classes


def test_a_dataset_without_a_holdout_split_holds_out_a_tenth_of_every_class():
    """10% of each class (rounded, at least one) is held out: another fraction scored the classifier on a
    different split than the one its record names, and than emoji32's documented one."""
    data = load_data(str(RECIPE))
    labels = torch.cat([data.train_y, data.holdout_y])
    expected = {c: max(1, round(0.1 * int((labels == c).sum()))) for c in labels.unique().tolist()}
    assert {c: int((data.holdout_y == c).sum()) for c in expected} == expected
    assert data.holdout == "10% of every class, seed 0"


def test_weight_decay_leaves_biases_and_norm_weights_alone():
    """AdamW decays the matrices only (``ndim > 1``): a run that decayed biases and norm scales too trained another
    classifier than the recorded weight_decay says. Two steps (the first at warm-up lr 0) keep the gradients
    the same at any weight_decay, so the 1-d parameters must come out identical."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(8) % 4
    x = torch.randn(8, 3, 8, 8, generator=g).clamp(-1, 1)
    data = ClassifierData(x, y, x[:4], y[:4], 4, {"dataset": "hand-made"}, "separate draw")

    def run(decay: float) -> dict[str, torch.Tensor]:
        model, _ = train_classifier(data, steps=2, batch_size=4, lr=1e-2, weight_decay=decay, pixels=0,
                                    arch={"dims": [8], "depths": [1]}, log=lambda _: None)
        return {k: v.clone() for k, v in model.state_dict().items()}

    plain, decayed = run(0.0), run(5.0)
    one_d = [k for k, v in plain.items() if v.ndim <= 1 and v.is_floating_point()]
    assert one_d and all(torch.equal(plain[k], decayed[k]) for k in one_d)
    assert any(not torch.equal(plain[k], decayed[k]) for k, v in plain.items() if v.ndim > 1)


def test_data_that_leave_no_training_images_are_refused():
    """With one image per class the holdout takes them all: refused in one line, as an empty holdout is; a check
    that needed both sides empty went on to train on nothing."""
    with pytest.raises(UserError, match="0 training and 3 holdout images; both need some"):
        load_data(str(RECIPE), overrides=["data.size=3", "data.num_classes=4"])


def test_warm_up_is_a_tenth_of_the_steps(monkeypatch):
    """The classifier warms up over 10% of its steps (at least 1) and then decays by a cosine: another warm-up
    trained (and recorded) a different classifier under the same settings."""
    import zoo.classifier_train as ct

    schedules = []
    monkeypatch.setattr(ct, "learning_rate", lambda schedule, step: schedules.append(dict(schedule)) or 0.0)
    y = torch.arange(4) % 4
    data = ClassifierData(torch.zeros(4, 3, 8, 8), y, torch.zeros(4, 3, 8, 8), y, 4, {}, "separate draw")
    for steps, warmup in ((3, 1), (20, 2)):
        schedules.clear()
        train_classifier(data, steps=steps, batch_size=4, pixels=0, arch={"dims": [8], "depths": [1]},
                         log=lambda _: None)
        assert schedules[0] == {"lr": 2e-3, "steps": steps, "warmup_steps": warmup, "lr_schedule": "cosine"}
