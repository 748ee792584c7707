"""Ctrl-C, SIGTERM, SIGHUP and SIGUSR1/2 stop a run between optimizer steps, on every rank at the same step.

A step's weight update, EMA update and step count must land together: a signal between them
would save step S with the weights of step S+1. So a SIGINT (Ctrl-C) or SIGTERM (what SLURM and
``torchrun`` send before a kill, e.g. on preemption) only asks the run to stop; the loop checks
the request after each step, saves ``last/`` and ends. Under ``torchrun`` the request travels
with the step's loss all-reduce, so all ranks stop after the same step even when the signal
reaches them at different moments. In one process a second signal stops at once (no save;
``last/`` keeps the previous checkpoint). Under ``torchrun`` it does not: a Ctrl-C reaches each
worker twice, from the terminal and relayed by torchrun, and torchrun itself kills workers that
take too long. A signal the process ignores (``nohup``, a shell's background job) stays ignored.
SIGHUP (the terminal closed) and SIGUSR1/SIGUSR2 (SLURM's ``--signal=USR1@SECONDS`` before a
job's time runs out) end a process at once by default: a run saves on them as on SIGTERM.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from types import FrameType
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    import torch
    from torch.utils.hooks import RemovableHandle

HANDLED = (signal.SIGINT, signal.SIGTERM)  # the stop signals a user sends (said when the process ignores one)
#: every signal that stops a run after saving: those above, a closed terminal's and SLURM's pre-emption warnings
STOPS_A_RUN = HANDLED + tuple(getattr(signal, name) for name in ("SIGHUP", "SIGUSR1", "SIGUSR2")
                              if hasattr(signal, name))


class StopRequested(KeyboardInterrupt):
    """The run stopped at a step boundary because of ``signum``, after saving ``last/`` (a KeyboardInterrupt:
    ``except Exception`` does not swallow it, and Python callers see Ctrl-C as they expect)."""

    def __init__(self, signum: int | None, step: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}" if signum is not None
                         else f"stopped at step {step}: another rank was signalled")
        self.signum, self.step = signum, step

    @property
    def exit_status(self) -> int:
        """The shell's status for a process ended by the signal: 130 for Ctrl-C, 143 for SIGTERM (also on a
        rank that stopped because another rank was signalled, as torchrun's SIGTERM would end it)."""
        return 128 + (self.signum if self.signum is not None else signal.SIGTERM)


class Terminated(KeyboardInterrupt):
    """SIGTERM as an exception, for commands whose work is safe to stop anywhere (prepare-latents): their
    ``finally`` blocks run (data workers end with the process) and the status is 143, as for the signal."""

    exit_status = 128 + signal.SIGTERM

    def __init__(self, what: str = "") -> None:
        super().__init__(f"stopped by SIGTERM{what}")


class Interrupted(KeyboardInterrupt):
    """A Ctrl-C that says what was kept: the CLI prints its message (``interrupted{what}``), status 130."""

    exit_status = 128 + signal.SIGINT

    def __init__(self, what: str = "") -> None:
        super().__init__(f"interrupted{what}")


@contextlib.contextmanager
def sigterm_raises(what: str = "") -> Iterator[None]:
    """While active, SIGTERM raises :class:`Terminated` (its message ends with ``what``) in the main thread,
    and a Ctrl-C's KeyboardInterrupt leaves it as :class:`Interrupted` with the same ending.

    By default SIGTERM ended the process at once: its DataLoader workers, which ignore the signal
    so that a process group's Ctrl-C cannot kill them, outlived it by seconds. A SIGTERM the process
    was started ignoring stays ignored; outside the main thread nothing is installed."""
    try:
        with _sigterm_handler(what):
            yield
    except KeyboardInterrupt as err:
        if type(err) is not KeyboardInterrupt:  # Terminated, or a StopRequested that already says what it saved
            raise
        raise Interrupted(what) from None


@contextlib.contextmanager
def _sigterm_handler(what: str) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) == signal.SIG_IGN:
        yield
        return

    def handle(signum: int, frame: FrameType | None) -> None:
        raise Terminated(what)

    previous = signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def ignored_stop_note() -> str | None:
    """What to say when the process was started ignoring a stop signal (a shell's ``cmd &`` in a script ignores
    SIGINT; ``nohup`` does not): Ctrl-C and ``kill -INT`` then do nothing, and a user waits on a run that never
    heard them. ``None`` when both are heard, or outside the main thread (nothing is installed there)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    ignored = [s.name for s in HANDLED if signal.getsignal(s) == signal.SIG_IGN]
    if not ignored:
        return None
    if len(ignored) == len(HANDLED):
        return ("this process ignores SIGINT and SIGTERM (its parent started it so): only SIGKILL stops it, "
                "losing the steps since the last checkpoint")
    heard = next(s.name for s in HANDLED if s.name not in ignored)
    why = ("a background job of a script: Ctrl-C and kill -INT do nothing" if ignored[0] == "SIGINT"
           else "its parent started it so: kill and kill -TERM do nothing")
    return (f"this process ignores {ignored[0]} ({why}); "
            f"stop it with kill -{heard.removeprefix('SIG')} {os.getpid()}, which saves last/ first")


class CutShort(Exception):
    """A stop was asked for while rank 0 alone sampled a grid or evaluated: that work is dropped so the run
    reaches its save within the grace torchrun and SLURM give before they kill (torchrun: 30 s; a grid or
    an FD of 256 samples takes longer), rather than being killed mid-way without saving."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopSignals:
    """While installed, the signals of :data:`STOPS_A_RUN` set :attr:`received` instead of ending the process.

    ``second_stops_now``: a second signal ends the process at once (one process; not under torchrun).
    Outside the main thread (where Python cannot set handlers) nothing is installed.
    """

    def __init__(self, second_stops_now: bool = True) -> None:
        self.received: int | None = None
        self.second_stops_now = second_stops_now
        self._previous: dict[int, object] = {}

    def install(self) -> "StopSignals":
        """Take over the signals of :data:`STOPS_A_RUN` (those the process does not ignore) until :meth:`restore`."""
        if threading.current_thread() is threading.main_thread():
            for signum in STOPS_A_RUN:
                if signal.getsignal(signum) != signal.SIG_IGN:
                    self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def restore(self) -> None:
        """Put back the handlers that were there before."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def cut_short_when_asked(self, module: torch.nn.Module) -> RemovableHandle:
        """Make every forward of ``module`` raise :class:`CutShort` once a stop was asked for: the model copy
        that samples or evaluates, and the FD's feature extractor, whose pass over the samples calls no
        model and can outlast torchrun's grace. Returns the hook's handle (to take it off a module that
        outlives the run)."""
        def check(module, args) -> None:
            if self.received is not None:
                raise CutShort(self.received)

        return module.register_forward_pre_hook(check)

    @property
    def flag(self) -> float:
        """1.0 when a stop was asked for on this process, else 0.0 (summed over ranks by the loop)."""
        return 0.0 if self.received is None else 1.0

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None and self.second_stops_now:  # now, as the process would have stopped without us
            previous = self._previous.get(signum)
            self.restore()
            if callable(previous):
                previous(signum, frame)  # Python's default SIGINT handler raises KeyboardInterrupt here
                return
            raise KeyboardInterrupt if signum == signal.SIGINT else SystemExit(128 + signum)
        if self.received is None:
            self.received = signum
