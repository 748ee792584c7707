"""Ctrl-C between optimizer steps only, so an interrupted run saves a checkpoint that resumes exactly."""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator


@contextlib.contextmanager
def interrupts_after() -> Iterator[None]:
    """Hold a SIGINT that arrives inside the block and act on it when the block ends.

    A step's weight update, EMA update and step count must land together: a Ctrl-C between
    them would save step S with the weights of step S+1. Outside the main thread (where Python
    cannot set handlers) the block runs unguarded.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if pending:
            if callable(previous):
                previous(signal.SIGINT, None)  # Python's default handler raises KeyboardInterrupt here
            elif previous == signal.SIG_DFL:
                raise KeyboardInterrupt
