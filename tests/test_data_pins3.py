"""Pins on the emoji32 split that no other test held: every class keeps at least one held-out image,
however small it is (the holdout is where FD, per-class FD and classifier accuracy are measured), and a recipe declaring fewer classes than emoji32's 9 categories is
refused before any image is rendered."""

from __future__ import annotations

import pytest
import torch

from zoo.errors import UserError
from zoo.training.emoji import CATEGORIES, _check_fits, holdout_mask


def test_a_class_too_small_for_its_tenth_still_holds_one_image_out():
    """round(0.1 x 3) is 0: without the documented floor of 1, a small category had no held-out image,
    so its per-class FD and holdout accuracy had nothing to score."""
    labels = torch.tensor([0] * 3 + [1] * 20 + [2] * 1)
    mask = holdout_mask(labels)
    assert [int(mask[labels == c].sum()) for c in range(3)] == [1, 2, 1]
    assert torch.equal(mask, holdout_mask(labels))  # seeded: the same split each time


def test_a_recipe_with_fewer_classes_than_emoji32s_categories_is_refused():
    """Labels run 0..8: a model of 4 classes would index its label embedding out of range mid-training
    (or, with a null label at 4, train category 4 as the unconditional one). 9, more, or none pass."""
    with pytest.raises(UserError, match="has 9 classes but the recipe declares 4") as err:
        _check_fits({}, (3, 32, 32), 4)
    assert err.value.key_path == "data.num_classes"
    for classes in (len(CATEGORIES), 10, None):
        assert _check_fits({}, (3, 32, 32), classes) == 32
