"""Output-path guards: ``~`` expanded once, dangling links and unlistable folders said in one line."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from zoo import atomic
from zoo.errors import UserError
from zoo.guards import check_writable, user_path


def test_a_tilde_is_expanded_once_and_a_folder_named_tilde_stays_one(tmp_path, monkeypatch):
    """`--out ./~/evals` (a folder the old unexpanded `--out=~/x` created) went to $HOME/evals: Path dropped the
    './', and a later expanduser took the bare '~' for the home directory."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert user_path("~/x") == tmp_path / "home" / "x"
    literal = user_path("./~/evals")
    assert literal == tmp_path / "~" / "evals" and literal.expanduser() == literal
    assert user_path("runs/a") == Path("runs/a")  # a plain relative path stays relative


def test_a_parent_that_is_a_link_to_nothing_is_one_line_before_the_work(tmp_path):
    """A dangling symlink among the parents passed the check; the write then failed with FileExistsError."""
    os.symlink(tmp_path / "gone", tmp_path / "dangling")
    with pytest.raises(UserError, match=r"dangling is a symbolic link to .*gone, which does not exist"):
        check_writable(tmp_path / "dangling" / "g.png", "--out")
    check_writable(tmp_path / "new" / "g.png", "--out")  # a missing folder is made later: fine


def test_leftovers_of_a_folder_that_cannot_be_listed_are_none(tmp_path, monkeypatch):
    """A shared home (mode 711) may be entered but not listed: reading an export inside it raised PermissionError."""
    def refuse(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "iterdir", refuse)
    assert atomic.leftovers(tmp_path / "export") == []
