"""Errors meant for people: a mistake in a recipe, a name or a path, not a bug in zoo.

The CLI prints a :class:`UserError` as one line on stderr and exits with status 2 (no
traceback); every other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
import os
from typing import Iterable


class UserError(Exception):
    """A mistake the user can fix, formatted as ``FILE:LINE: key a.b.c: message (hint)``.

    ``file``, ``line`` and ``key_path`` say where the mistake is (any may be unknown);
    ``suggestion`` is a short hint such as ``"did you mean depth?"``. Code that knows the
    location better than the raiser fills it in with :meth:`locate`.
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        line: int | None = None,
        key_path: str | None = None,
        suggestion: str | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.file = file
        self.line = line
        self.key_path = key_path
        self.suggestion = suggestion

    quiet = False  # True: already reported by another process (torchrun's rank 0); the CLI prints nothing

    def locate(self, file: str | None = None, line: int | None = None, key_path: str | None = None) -> "UserError":
        """Fill in the parts of the location that are still unknown; returns ``self`` to re-raise."""
        if self.file is None and self.line is None:
            self.file, self.line = file, line
        if self.key_path is None:
            self.key_path = key_path
        return self

    def __str__(self) -> str:
        where = ""
        if self.file is not None:
            where = f"{self.file}:{self.line}: " if self.line is not None else f"{self.file}: "
        key = f"key {self.key_path}: " if self.key_path else ""
        hint = f" ({self.suggestion})" if self.suggestion else ""
        return f"{where}{key}{self.message}{hint}"


class ContractError(UserError, TypeError):
    """A component (usually a plugin's) that breaks the interface its parent calls it through: the
    plugin's code to fix, said in one line like any user error (and still a ``TypeError``)."""


def did_you_mean(word: str, candidates: Iterable[str]) -> str | None:
    """``"did you mean X?"`` for the closest matches of ``word`` among ``candidates``, or ``None``."""
    close = difflib.get_close_matches(str(word), [str(c) for c in candidates], n=3, cutoff=0.6)
    if not close:
        return None
    if len(close) == 1:
        return f"did you mean {close[0]}?"
    return f"did you mean {', '.join(close[:-1])} or {close[-1]}?"


def tracebacks_wanted() -> bool:
    """Whether ``ZOO_TRACEBACK`` asks for tracebacks of user errors: set and not 0/false/no/off."""
    return os.environ.get("ZOO_TRACEBACK", "").strip().lower() not in ("", "0", "false", "no", "off")
