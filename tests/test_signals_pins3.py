"""Pins on zoo.training.signals, the stop handling a preempted or Ctrl-C'd run relies on, that no other test
held directly: the exit statuses the shell and SLURM see, a SIGTERM the process was started ignoring staying
ignored, and which signal a run reports when several arrive. Handlers are called directly (no signal sent)."""

from __future__ import annotations

import signal

import pytest

from zoo.training.signals import StopRequested, StopSignals, Terminated, sigterm_raises

pytestmark = pytest.mark.usefixtures("one_thread")


def test_stop_exit_status_is_the_signals_and_sigterms_for_a_rank_stopped_by_another():
    """128+signal: 130 for Ctrl-C, 143 for SIGTERM, and 143 on a rank that stopped because another was
    signalled (as torchrun's SIGTERM would end it); 130 there would read as a user's Ctrl-C."""
    assert StopRequested(signal.SIGINT, 5).exit_status == 130
    assert StopRequested(signal.SIGTERM, 5).exit_status == 143
    assert StopRequested(None, 5).exit_status == 143


def test_sigterm_raises_leaves_an_ignored_sigterm_ignored():
    """A process started ignoring SIGTERM keeps ignoring it inside sigterm_raises; installing the handler
    anyway would let a SIGTERM the parent meant to be ignored end prepare-latents."""
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with sigterm_raises(" (test)"):
            assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_sigterm_raises_keeps_terminated_as_terminated():
    """A Terminated raised inside leaves as Terminated (status 143), not re-worded as a Ctrl-C's Interrupted."""
    with pytest.raises(KeyboardInterrupt) as err:  # (Interrupted is one too: caught here, not by pytest)
        with sigterm_raises(" (test)"):
            raise Terminated(" (test)")
    assert type(err.value) is Terminated and err.value.exit_status == 143


def test_stop_signals_leave_ignored_signals_ignored():
    """install() takes over only the stop signals the process hears: a nohup'd run keeps ignoring SIGHUP."""
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    stops = StopSignals().install()
    try:
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) == stops._handle
    finally:
        stops.restore()
        signal.signal(signal.SIGHUP, previous)


def test_a_second_signal_under_torchrun_keeps_the_first_and_does_not_stop_at_once():
    """second_stops_now=False (torchrun relays Ctrl-C twice): the second signal neither ends the process
    (the save would be lost) nor replaces the first one the run reports."""
    stops = StopSignals(second_stops_now=False)
    stops._handle(signal.SIGINT, None)
    stops._handle(signal.SIGTERM, None)
    assert stops.received == signal.SIGINT and stops.flag == 1.0
