"""Pins on the recipe difference a resume reports (``zoo train --resume`` names the first changed key and its
value on both sides): a list index past one side's end reads as ``absent`` rather than crashing the report;
and the YAML reader's own bounds, which ``--set`` values reach without the file-size check of a recipe file:
its character bound and the 100-character bound on a float (not only on an int).

Found by mutation testing: no test called ``value_at`` with an index at the end of a list, gave
``parse_yaml`` an over-long text directly, or wrote an over-long float."""

from __future__ import annotations

import pytest

from zoo.errors import UserError
from zoo.recipe_diff import value_at
from zoo.recipe_yaml import MAX_FILE_BYTES, MAX_NUMBER_CHARS, parse_yaml

pytestmark = pytest.mark.usefixtures("one_thread")


def test_value_at_reads_list_items_and_says_absent_past_the_end():
    """'model.branches.2' of a recipe with two branches is absent (one side of a difference lacks it): an
    off-by-one bound (index <= len) would raise IndexError while the refusal message is being written."""
    recipe = {"model": {"type": "dimr", "branches": [{"dim": 64}, {"dim": 128}], "block": "dit"}}
    assert value_at(recipe, "model.branches.1.dim") == "128"
    assert value_at(recipe, "model.branches.0") == '{"dim": 64}'
    assert value_at(recipe, "model.branches.2") == "absent"
    assert value_at(recipe, "model.branches.2.dim") == "absent"
    assert value_at(recipe, "model.block.type") == '"dit"'  # a component given by name has that name as type
    assert value_at(recipe, "model.block.depth") == "absent"
    assert value_at(recipe, "diffusion.schedule") == "absent"


def test_parse_yaml_refuses_text_beyond_the_size_bound_itself():
    """parse_yaml bounds its input whoever calls it (``--set model.x=<text>`` skips the recipe file's stat check):
    one character past MAX_FILE_BYTES is refused before parsing, and exactly MAX_FILE_BYTES is read."""
    text = "a: 1\n#" + "x" * (MAX_FILE_BYTES - 6)
    assert len(text) == MAX_FILE_BYTES and parse_yaml(text, "f")[0] == {"a": 1}
    with pytest.raises(UserError, match=f"refused: {MAX_FILE_BYTES + 1:,} characters of YAML"):
        parse_yaml(text + "x", "--set big")


def test_an_overlong_float_is_refused_like_an_overlong_int():
    """The 100-character bound is on numbers, floats included: a 200-digit learning rate is refused with its line,
    not read as a string-sized float; 100 characters are still a number."""
    with pytest.raises(UserError, match="a number of 203 characters") as info:
        parse_yaml("train:\n  lr: 0." + "0" * 200 + "1\n", "r.yaml")
    assert info.value.line == 2
    assert parse_yaml("lr: 0." + "0" * (MAX_NUMBER_CHARS - 3) + "1\n", "r.yaml")[0] == {"lr": 1e-98}
