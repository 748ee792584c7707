"""Pins on recipe loading and ``--set`` overrides (:mod:`zoo.recipe`) that no other test held:
an override value containing ``=`` keeps it (only the first ``=`` separates key and value);
NaN or infinity given from Python is refused rather than read back as the string ``"NaN"``;
resolving overrides on a loaded :class:`Recipe` leaves that recipe unchanged (a sweep reuses it);
YAML aliases in a recipe without ``_base_`` are copies too; a recipe file of exactly the size bound is
read; a ``_base_`` that is not a path is a located error; a comment-only file is an empty recipe; and a
recipe dict's relative ``_base_`` is read from the current directory.

Found by mutation testing of zoo/recipe.py: each test fails with one plausible one-token bug."""

from __future__ import annotations

import textwrap

import pytest

from zoo.errors import UserError
from zoo.recipe import load_file, resolve
from zoo.recipe_yaml import MAX_FILE_BYTES

pytestmark = pytest.mark.usefixtures("one_thread")


def test_an_override_value_may_itself_contain_an_equals_sign():
    """``--set data.prompt=a=b`` sets ``a=b``: splitting at the last ``=`` would set key ``data.prompt=a``'s
    value ``b`` (or the key ``prompt`` to ``b``), losing part of what the user typed."""
    recipe = resolve({"data": {}}, ["data.prompt=a=b", "data.expr=x==y"])
    assert recipe.data["data"] == {"prompt": "a=b", "expr": "x==y"}
    assert recipe.origin(("data", "prompt")) == ("--set data.prompt=a=b", None)
    assert resolve({"data": {}}, {"data.prompt": "k=v"}).data["data"]["prompt"] == "k=v"  # from Python too


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_nan_and_infinite_overrides_from_python_are_refused(value):
    """``{"train.lr": float("nan")}``: json.dumps without allow_nan=False writes ``NaN``, which YAML reads back
    as the *string* "NaN", so a sweep's bad value would reach the recipe check as a string, or silently pass."""
    with pytest.raises(UserError, match="NaN and infinities are refused"):
        resolve({"train": {}}, {"train.lr": value})


def test_resolving_overrides_on_a_loaded_recipe_leaves_it_unchanged():
    """A sweep loads a Recipe once and resolves one variant per setting: writing the overrides into the
    given Recipe's data (no copy) would make every later variant inherit the earlier variants' settings."""
    base = resolve({"model": {"type": "dit", "depth": 2, "mlp": {"type": "mlp", "act": "gelu"}}})
    one = resolve(base, ["model.depth=5", "model.mlp.act=gelu_tanh"])
    two = resolve(base, ["model.hidden_size=64"])
    assert one.data["model"]["depth"] == 5 and one.data["model"]["mlp"]["act"] == "gelu_tanh"
    assert base.data == {"model": {"type": "dit", "depth": 2, "mlp": {"type": "mlp", "act": "gelu"}}}
    assert two.data["model"] == {"type": "dit", "depth": 2, "hidden_size": 64, "mlp": {"type": "mlp", "act": "gelu"}}
    assert ("model", "depth") not in base.origins or base.origins[("model", "depth")][0] != "--set model.depth=5"


def test_yaml_aliases_are_copies_in_a_recipe_without_a_base(tmp_path):
    """``extra: *m`` is a copy of the anchored mapping even when no ``_base_`` merge copies it: a shared
    object would let ``--set model.mlp.act=gelu`` change ``sample.extra`` too (and a list alias likewise)."""
    path = tmp_path / "alias.yaml"
    path.write_text(textwrap.dedent("""\
        model:
          mlp: &m {type: mlp, act: gelu_tanh}
          sizes: &s [1, 2]
        sample:
          extra: *m
          sizes: *s
        """))
    data = resolve(path, ["model.mlp.act=gelu", "model.sizes.0=7"]).data
    assert data["model"]["mlp"]["act"] == "gelu" and data["sample"]["extra"]["act"] == "gelu_tanh"
    assert data["model"]["sizes"] == [7, 2] and data["sample"]["sizes"] == [1, 2]


def test_a_recipe_file_of_exactly_the_size_bound_is_read_and_one_byte_more_is_refused(tmp_path):
    """The bound is inclusive, as parse_yaml's own: ``size >= MAX_FILE_BYTES`` would refuse a file of exactly
    MAX_FILE_BYTES bytes that the YAML reader accepts."""
    path = tmp_path / "big.yaml"
    text = "a: 1\n#" + "x" * (MAX_FILE_BYTES - 6)
    path.write_text(text)
    assert path.stat().st_size == MAX_FILE_BYTES and load_file(path).data == {"a": 1}
    path.write_text(text + "x")
    with pytest.raises(UserError, match=f"refused: a recipe of {MAX_FILE_BYTES + 1:,} bytes"):
        load_file(path)


@pytest.mark.parametrize("bases, key", [("5", "_base_"), ("[tiny_base.yaml, {a: 1}]", "_base_.1")])
def test_a_base_that_is_not_a_path_is_refused_at_its_key(tmp_path, bases, key):
    """``_base_: 5`` or a mapping among the bases: without the check, ``base_dir / Path(5)`` raises a bare
    TypeError (a traceback) instead of a one-line error at the file, line and key."""
    (tmp_path / "tiny_base.yaml").write_text("model: {type: dit}\n")
    path = tmp_path / "r.yaml"
    path.write_text(f"_base_: {bases}\nmodel: {{depth: 2}}\n")
    with pytest.raises(UserError, match="_base_ must be a path or a list of paths") as info:
        resolve(path)
    assert info.value.key_path == key and info.value.line == 1 and info.value.file == str(path)


def test_a_comment_only_recipe_is_empty_and_serves_as_a_base(tmp_path):
    """A file of comments only (a placeholder base) reads as an empty mapping: treating YAML's null as a
    non-mapping would refuse it with 'a recipe must be a mapping of sections, got NoneType'."""
    (tmp_path / "empty.yaml").write_text("# nothing here yet\n")
    child = tmp_path / "child.yaml"
    child.write_text("_base_: ./empty.yaml\nmodel: {type: dit, depth: 2}\n")
    assert load_file(tmp_path / "empty.yaml").data == {}
    assert resolve(child).data == {"model": {"type": "dit", "depth": 2}}


def test_a_recipe_dicts_relative_base_is_read_from_the_current_directory(tmp_path, monkeypatch):
    """``zoo.build_model({"_base_": "mine.yaml", ...})`` reads mine.yaml where the script runs: resolving it
    against any other directory would say 'base recipe not found'."""
    (tmp_path / "mine.yaml").write_text("model: {type: dit, depth: 2, hidden_size: 32}\n")
    monkeypatch.chdir(tmp_path)
    data = resolve({"_base_": "mine.yaml", "model": {"depth": 3}}).data
    assert data == {"model": {"type": "dit", "depth": 3, "hidden_size": 32}}
