"""Pins of zoo.run_summary (``zoo compare RUN``) that mutation testing found the rest of the suite let through.

* an FD record of a log written before records named their reference is attributed to the stored recipe's
  ``train.eval_ref`` when it set one (else to the run's own data);
* the training loss averages the finite logged losses only, each weighed by the steps it covers: a NaN
  record does not turn the run's loss into NaN.

Hand-written records and recipe dicts: no training.
"""

from __future__ import annotations

import math

from zoo.run_summary import _eval_every_reference, _mean_loss


def test_a_legacy_fd_record_names_the_stored_eval_ref():
    """Mutation: the ``train.eval_ref`` branch dropped. An FD measured against an ADM batch was then reported
    as one against 'the run's own data', and compared as such with runs that really used their own data."""
    stored = {"train": {"eval_ref": "/refs/VIRTUAL_imagenet256_labeled.npz"}, "data": {"dataset": "emoji32"}}
    assert _eval_every_reference(stored) == "/refs/VIRTUAL_imagenet256_labeled.npz"
    own = _eval_every_reference({"train": {}, "data": {"dataset": "emoji32"}})
    assert own.startswith("emoji32 (the run's own data")
    assert _eval_every_reference({}).startswith("synthetic (the run's own data")


def test_the_mean_loss_skips_a_non_finite_record_and_weighs_the_rest_by_their_steps():
    """Mutation: the ``_finite(loss)`` condition dropped. One NaN (or inf) record, a spike of a run that
    recovered, made ``zoo compare``'s loss NaN for the whole window. Records at steps 2 (1.0), 4 (NaN) and
    8 (4.0) over (0, 8]: (1.0 * 2 + 4.0 * 4) / (2 + 4) = 3.0 (by hand)."""
    records = [{"step": 2, "loss": 1.0}, {"step": 4, "loss": math.nan}, {"step": 8, "loss": 4.0}]
    assert _mean_loss(records, 0, 8) == 3.0
    records[1]["loss"] = math.inf
    assert _mean_loss(records, 0, 8) == 3.0
    assert _mean_loss([{"step": 2, "loss": math.nan}], 0, 2) is None  # nothing finite: no loss, not NaN
