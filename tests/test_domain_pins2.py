"""Pins on how value domains read and refuse that a sixth round of mutation testing could change unseen:
two ranges on one value combine to the stricter end, an open integer bound is stated as the first
integer allowed, 10**6 is written 1e6, ``Time`` excludes 0, a list given where a registry dict's name
belongs is refused (not a TypeError), and a table key marked ``Required`` is asked for."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import pytest

import zoo
from zoo.domains import Classes, OneOf, Range, Time, describe, domain_text, fits, range_of
from zoo.errors import UserError

RECIPES = Path(__file__).parent / "recipes"


def test_two_ranges_on_one_value_combine_to_the_open_end_where_their_ends_meet():
    """[0, 1] and (0, inf) meet at 0: the value must be > 0. Taking the closed end told a user 0 was allowed."""
    for meta in ((Range(0, 1), Range(0, lo_open=True)), (Range(0, lo_open=True), Range(0, 1))):
        assert range_of(meta) == Range(0, 1, lo_open=True, hi_open=False)
        assert domain_text(Annotated[float, meta[0], meta[1]]) == "in (0, 1]"
    assert range_of((Range(hi=1), Range(0, 1, hi_open=True))) == Range(0, 1, hi_open=True)


def test_an_open_integer_lower_bound_is_stated_as_the_first_integer_allowed():
    """An int > 0 up to 10 reads "in [1, 10]": keeping 0 and closing the bracket said 0 was allowed."""
    ann = Annotated[int, Range(0, 10, lo_open=True)]
    assert domain_text(ann) == "in [1, 10]"
    assert Range(2, 10, lo_open=True, hi_open=True).describe(integer=True) == "in [3, 9]"
    assert not fits(0, ann) and fits(1, ann)


def test_a_million_is_written_1e6_in_a_refusal():
    """num_classes' bound is 10**6 exactly: a strict > 10**6 wrote it "1000000" while 10**7 read "1e7"."""
    assert describe(Classes) == "a positive integer <= 1e6"
    with pytest.raises(UserError, match=r"num_classes must be a positive integer <= 1e6, got 2000000"):
        zoo.load_recipe(RECIPES / "tiny_train.yaml", ["model.num_classes=2000000"])


def test_a_diffusion_time_excludes_zero():
    """zoo.domains.Time is a time in (0, 1] for a plugin's parameter: t = 0 (no noise) must not fit it."""
    assert not fits(0.0, Time) and not fits(0, Time)
    assert fits(1e-5, Time) and fits(1.0, Time) and not fits(1.5, Time)
    assert domain_text(Time) == "in (0, 1]"


def test_a_list_where_a_registry_dicts_name_belongs_does_not_fit_and_does_not_raise():
    """OneOf reads its choices at check time, often a registry dict: ``[name] in dict`` raises TypeError
    (unhashable), which escaped as a traceback instead of "must be one of ..."."""
    name = Annotated[str, OneOf({"eps_mse": None, "hybrid_vlb": None}, "objective")]
    assert fits("eps_mse", name)
    assert not fits(["eps_mse"], name) and not fits({"type": "eps_mse"}, name)
    assert not OneOf({"a": 1}).contains(["a"])


def test_a_multiscale_objective_without_its_coefficients_is_refused(capsys):
    """coeffs is Required in the multiscale table: without the check the recipe passed validation and the
    loss had no per-branch weights to train with."""
    from zoo.cli import main

    code = main(["build", str(RECIPES / "tiny_dimr_pixels.yaml"), "--set", "diffusion.objective={type: multiscale}"])
    assert code == 2
    assert "objective 'multiscale' needs coeffs: a non-empty list of numbers >= 0" in capsys.readouterr().err
