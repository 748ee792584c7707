"""Pins on ``zoo compare``'s option checks and notes (:mod:`zoo.commands.compare`): ``--batch`` and
``--repeats`` start at 1 and ``--warmup`` at 0 (no untimed round is a valid choice), each bound refused
as one line with exit 2 before any model is built, and 0 warm-up rounds reach the timing as given.

Found by mutation testing: no test gave ``--batch 0`` or ``--warmup 0``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import zoo
from zoo.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = str(Path(__file__).parent / "recipes" / "tiny_train.yaml")


@pytest.mark.parametrize("option", [["--batch", "0"], ["--repeats", "0"], ["--warmup", "-1"]])
def test_a_batch_or_repeats_below_1_or_a_negative_warmup_is_refused(option, capsys, monkeypatch):
    """``--batch 0`` would time empty steps (or fail inside the model with a traceback) and report a step time
    for zero images; each bound is refused before a model is built."""
    import zoo.compare

    monkeypatch.setattr(zoo.compare, "measure", lambda *a, **k: pytest.fail("models were built"))
    assert main(["compare", TINY, "--device", "cpu", *option]) == 2
    err = capsys.readouterr().err
    assert "--batch and --repeats must be at least 1 and --warmup at least 0" in err and err.count("\n") == 1


@pytest.mark.parametrize("option, got", [(["--warmup", "99999999999999999999"], "99999999999999999999 and 5"),
                                         (["--repeats", "10001"], "2 and 10001")])
def test_warmup_or_repeats_past_10000_are_refused_before_any_model_is_built(option, got, capsys, monkeypatch):
    """``--warmup 99999999999999999999`` timed rounds that never ended."""
    import zoo.compare

    monkeypatch.setattr(zoo.compare, "measure", lambda *a, **k: pytest.fail("models were built"))
    assert main(["compare", TINY, "--device", "cpu", *option]) == 2
    assert capsys.readouterr().err == f"zoo: error: --warmup and --repeats must be at most 10,000, got {got}\n"


def test_no_warmup_round_is_accepted(capsys, monkeypatch):
    """``--warmup 0`` (time from the first round) is valid and reaches the timing as 0: a bound of 1 would
    refuse it."""
    import zoo.compare

    seen = {}
    monkeypatch.setattr(zoo.compare, "measure", lambda recipes, overrides, **kw: seen.update(kw) or [])
    assert main(["compare", TINY, "--no-time", "--warmup", "0", "--repeats", "1", "--batch", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert (seen["warmup"], seen["repeats"], seen["batch"], seen["time_it"]) == (0, 1, 1, False)


@pytest.mark.parametrize("precision, half", [("bf16", True), ("fp16", True), ("fp32", False), (None, False)])
def test_the_memory_check_estimates_a_half_precision_recipe_as_its_step_runs(precision, half, monkeypatch):
    """A ``train.precision: bf16`` (or fp16) recipe's timed step keeps most activations in 2 bytes: estimating
    it as float32 would refuse --batch values that fit (and name a smaller --batch than the device holds)."""
    from types import SimpleNamespace

    from zoo import memory
    from zoo.commands.compare import check_memory

    seen = []

    def estimate(model, training=True, half_precision=False, ema=True):
        seen.append((training, half_precision, ema))
        return SimpleNamespace(params=10, fixed=160, per_sample=8)

    monkeypatch.setattr(memory, "estimate", estimate)
    monkeypatch.setattr(memory, "available_bytes", lambda device: 160 + 8 * 4)
    overrides = [] if precision is None else [f"train.precision={precision}"]
    check_memory([TINY], overrides, 4, "cpu")  # fits exactly: weights, AdamW state, gradients + 4 samples
    assert seen == [(True, half, False)]
    with pytest.raises(zoo.UserError, match=f"timing {TINY} at --batch 5 needs about"):
        check_memory([TINY], overrides, 5, "cpu")
