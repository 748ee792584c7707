"""Errors meant for people: a mistake in a recipe, a name or a path, not a bug in zoo.

The CLI prints a :class:`UserError` as one line on stderr and exits with status 2 (no
traceback); every other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import os
from typing import Iterable, Iterator, Sequence


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


@contextlib.contextmanager
def reported_by_rank_0(rank: int | None = None) -> Iterator[None]:
    """Around checks every torchrun process makes alike (the same arguments, the same files): their
    mistake is the same on every rank, so the CLI prints it from rank 0 alone, not once per process.
    ``rank``: this process's (default: torchrun's ``RANK``)."""
    try:
        yield
    except UserError as err:
        err.quiet = (int(os.environ.get("RANK", "0")) if rank is None else rank) != 0
        raise


class ContractError(UserError, TypeError):
    """A component (usually a plugin's) that breaks the interface its parent calls it through: the
    plugin's code to fix, said in one line like any user error (and still a ``TypeError``)."""


class CarriedUserError(UserError):
    """A :class:`UserError` crossing from a DataLoader worker to the main process whole.

    A worker passes an exception on as its type and its traceback text only, and the main process
    rebuilds it as ``type(text)``. Raised in the worker (:meth:`for_transport`), this error's text is its
    fields as JSON behind a marker; rebuilt from the traceback text, it reads them back, so the user sees
    the worker's one line with its file, key and hint, and callers can still change the hint.
    """

    _MARK = "zoo-user-error-fields="

    def __init__(self, message: str, **where: object):
        fields = None if where or self._MARK not in message else _fields_after(message, self._MARK)
        if fields is None:
            super().__init__(message, **where)  # type: ignore[arg-type]
        else:
            super().__init__(fields.pop("message"), **fields)
        self._in_transport = False

    @classmethod
    def for_transport(cls, err: UserError) -> "CarriedUserError":
        """``err`` as the worker raises it: its text carries its fields."""
        carried = cls(err.message, file=err.file, line=err.line, key_path=err.key_path, suggestion=err.suggestion)
        carried._in_transport = True
        return carried

    def __str__(self) -> str:
        if self._in_transport:
            fields = {"message": self.message, "file": self.file, "line": self.line, "key_path": self.key_path,
                      "suggestion": self.suggestion}
            return self._MARK + json.dumps(fields)
        return super().__str__()


def _fields_after(text: str, mark: str) -> dict | None:
    """The JSON object on the line after the last ``mark`` in ``text``, or ``None`` when it does not read."""
    line = text.rsplit(mark, 1)[1].split("\n", 1)[0]
    try:
        fields = json.loads(line)
    except ValueError:
        return None
    keys = {"message", "file", "line", "key_path", "suggestion"}
    return fields if isinstance(fields, dict) and set(fields) == keys and isinstance(fields["message"], str) else None


def one_of(words: Sequence[str]) -> str:
    """``a``, ``a or b``, ``a, b or c``: alternatives as a message names them."""
    return ", ".join(words[:-1]) + " or " + words[-1] if len(words) > 1 else words[0]


def some_of(names: Sequence[str], most: int = 3) -> str:
    """``a, b, c`` or, past ``most``, ``a, b, c and 4 more``: a list a one-line message can hold."""
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def did_you_mean(word: str, candidates: Iterable[str]) -> str | None:
    """``"did you mean X?"`` for the closest matches of ``word`` among ``candidates``, or ``None``."""
    names = [str(c) for c in candidates]
    close = [c for c in names if c.lower() == str(word).lower()]  # DiT for dit: difflib scores it 0.33
    close = close or difflib.get_close_matches(str(word), names, n=3, cutoff=0.6)
    if not close:
        return None
    if len(close) == 1:
        return f"did you mean {close[0]}?"
    return f"did you mean {', '.join(close[:-1])} or {close[-1]}?"


def tracebacks_wanted() -> bool:
    """Whether ``ZOO_TRACEBACK`` asks for tracebacks of user errors: set and not 0/false/no/off."""
    return os.environ.get("ZOO_TRACEBACK", "").strip().lower() not in ("", "0", "false", "no", "off")
