"""Pins on ``zoo compare`` that no other test held: only a ``_``-named file *without* a model is refused as
a base file; a recipe of the user's that happens to start with ``_`` but has a model is compared."""

from __future__ import annotations

import pytest

from zoo.compare import check_not_a_base_file
from zoo.errors import UserError


def test_only_an_underscore_file_without_a_model_is_refused_as_a_base_file():
    """Refusing every ``_``-named file would turn away a complete recipe (``_scratch_dit.yaml``) that has
    its own model section, with advice to leave it out of the compare."""
    check_not_a_base_file("recipes/_scratch_dit.yaml", {"model": {"type": "dit"}})  # a recipe: compared
    check_not_a_base_file("recipes/dit.yaml", {})  # not underscore-named: left to the later checks
    with pytest.raises(UserError, match="is a base file"):
        check_not_a_base_file("recipes/emoji32/_base_emoji32.yaml", {"data": {"dataset": "emoji32"}})
