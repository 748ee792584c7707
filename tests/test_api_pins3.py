"""Pins on zoo's public Python API (zoo.api) that no other test held: a bare ``_target_`` model section is
built as one, a value given both in a component's spec and as an argument is refused, and the loader of a
model recipe refuses a recipe without a model section before any command works on it."""

from __future__ import annotations

import pytest
from torch import nn

import zoo
from zoo.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")


class _Tiny(nn.Module):
    """A model of another codebase, named by its dotted path."""

    def __init__(self, width: int = 3) -> None:
        super().__init__()
        self.lin = nn.Linear(2, width)

    def forward(self, x, t, y=None):
        return x


def test_build_model_takes_a_bare_target_model_section():
    """zoo.build_model({"_target_": ..., kwargs}) builds that class with those kwargs, as the docstring says;
    treating only {"type": ...} as a bare section read the dict as a whole recipe without a model."""
    model = zoo.build_model({"_target_": f"{__name__}._Tiny", "width": 5})
    assert isinstance(model, _Tiny) and model.lin.out_features == 5


def test_build_component_refuses_a_value_given_in_the_spec_and_as_an_argument():
    """dim in the spec and dim= from the parent: one of them would be silently dropped (the block built
    at a width other than the one its spec says)."""
    with pytest.raises(UserError, match="dim is given both"):
        zoo.build_component("block", {"type": "transformer", "num_heads": 2, "dim": 8}, dim=16)


def test_load_model_recipe_refuses_a_recipe_without_a_model_section(tmp_path):
    """train/sample/convert load through load_model_recipe: a recipe lacking `model` is one UserError naming
    its file there, not a crash later on a missing key."""
    from zoo.api import load_model_recipe

    path = tmp_path / "no_model.yaml"
    path.write_text("train:\n  steps: 10\n", encoding="utf-8")
    assert "train" in zoo.load_recipe(path)  # a valid recipe as such
    with pytest.raises(UserError, match="no_model.yaml"):
        load_model_recipe(path)
