"""Hostile recipes are refused quickly with one message naming the file and line, before any
Python object is built: alias bombs, deep nesting, huge scalars and files; ``--set`` indices
out of range name the list and its length."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from zoo.cli import main
from zoo.errors import UserError
from zoo.recipe import resolve
from zoo.recipe_yaml import MAX_FILE_BYTES, MAX_NODES, parse_yaml

LAUGHS = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{c}: &{c} [{', '.join([f'*{p}'] * 10)}]\n" for p, c in zip("abcdefgh", "bcdefghi")
)  # 10^9 strings once expanded, 1 kB written

CASES = {
    "billion_laughs": (LAUGHS, 4, f"more than {MAX_NODES:,} YAML nodes with aliases expanded"),
    "deep_flow": ("model: " + "[" * 20_000 + "]" * 20_000 + "\n", 1, "nesting deeper than 64 levels"),
    "deep_block": ("".join(" " * i + f"k{i}:\n" for i in range(100)) + " " * 100 + "v: 1\n", 64, "nesting deeper"),
    "deep_by_aliases": ("".join(f"l{i}: &a{i} " + "[" * 40 + (f"*a{i - 1}" if i else "1") + "]" * 40 + "\n"
                                for i in range(5)), 2, "nesting deeper than 64 levels (aliases expanded)"),  # fmt: skip
    "recursive_alias": ("a: &a [1, *a]\n", 1, "alias *a refers to a node that contains it"),
    "giant_int": ("model:\n  depth: " + "9" * 5000 + "\n", 2, "a number of 5,000 characters (at most 100)"),
    "huge_string": ("model:\n  type: '" + "x" * 200_000 + "'\n", 2, "a scalar of 200,000 characters (at most 65,536)"),
    "wide_list": ("a: [" + ", ".join(["1"] * 50_000) + "]\n", 1, f"more than {MAX_NODES:,} YAML nodes"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_yaml_is_refused_quickly_with_file_and_line(tmp_path: Path, name: str, capsys):
    text, line, message = CASES[name]
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    start = time.process_time()  # CPU time: other jobs on a busy CI machine do not count
    status = main(["build", str(path)])
    seconds = time.process_time() - start
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and "Traceback" not in err, err[:300]
    assert err.startswith(f"zoo: error: {path}:{line}: refused: {message}"), err[:300]
    assert seconds < 1.0, seconds  # measured 0.001-0.2 s


def test_a_recipe_file_beyond_the_size_bound_is_refused_unread(tmp_path: Path):
    path = tmp_path / "big.yaml"
    path.write_text("model: {type: dit}\n" + "#" * MAX_FILE_BYTES)
    with pytest.raises(UserError, match=rf"big.yaml: refused: a recipe of {MAX_FILE_BYTES + 19:,} bytes"):
        resolve(path)


def test_what_recipes_use_still_loads():
    """Anchors, aliases and merge keys within the bounds keep ``yaml.safe_load``'s meaning."""
    text = "base: &b {depth: 2, width: 8}\nmodel:\n  <<: *b\n  depth: 3\nlist: [*b, *b]\nx: 1e-4\n"
    data, origins = parse_yaml(text, "f.yaml")
    assert data == {"base": {"depth": 2, "width": 8}, "model": {"depth": 3, "width": 8},
                    "list": [{"depth": 2, "width": 8}] * 2, "x": 1e-4}  # fmt: skip
    assert origins[("model", "depth")] == ("f.yaml", 4) and origins[("list",)] == ("f.yaml", 5)
    nested = "a: " + "[" * 63 + "]" * 63 + "\n"  # 64 levels with the top mapping: the bound itself
    assert parse_yaml(nested, "f")[0]["a"] is not None


@pytest.mark.parametrize("override, message", [
    ("model.sizes.3=7", "cannot set model.sizes.3: no item 3; model.sizes is a list of 3 (indices 0..2)"),
    ("model.sizes.9.a=1", "cannot set model.sizes.9.a: no item 9; model.sizes is a list of 3 (indices 0..2)"),
    ("model.sizes.x=1", "cannot set model.sizes.x: 'x' is not an index; model.sizes is a list of 3 (indices 0..2)"),
    ("model.empty.0=1", "cannot set model.empty.0: no item 0; model.empty is a list of 0 (no valid index)"),
])  # fmt: skip
def test_set_index_out_of_range_names_the_list_and_its_length(tmp_path: Path, override: str, message: str):
    path = tmp_path / "r.yaml"
    path.write_text("model: {type: x, sizes: [1, 2, 3], empty: []}\n")
    with pytest.raises(UserError) as info:
        resolve(path, [override])
    assert str(info.value) == f"--set {override}: {message}"
    assert resolve(path, ["model.sizes.2=7"]).data["model"]["sizes"] == [1, 2, 7]
