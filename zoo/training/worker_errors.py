"""User errors raised inside DataLoader workers, delivered to the main process whole.

A worker hands its exception to the main process as a type and a traceback text; a plain
:class:`~zoo.errors.UserError` rebuilt from that text is the whole traceback with its hint and
location flattened into it. Datasets decorate ``__getitem__`` with :func:`user_errors_cross_workers`
so the user sees the worker's error as the one line it would be in the main process.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, TypeVar

from torch.utils.data import get_worker_info

from zoo.errors import CarriedUserError, UserError

GetItem = TypeVar("GetItem", bound=Callable[..., Any])


def user_errors_cross_workers(getitem: GetItem) -> GetItem:
    """Wrap a dataset's ``__getitem__``: a ``UserError`` it raises in a worker reaches the main process
    as a :class:`CarriedUserError` with the same message, file, line, key and hint. In the main
    process (``num_workers=0``) the error passes through untouched."""

    @functools.wraps(getitem)
    def wrapped(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return getitem(self, *args, **kwargs)
        except UserError as err:
            if get_worker_info() is None:
                raise
            raise CarriedUserError.for_transport(err) from None

    return wrapped  # type: ignore[return-value]
