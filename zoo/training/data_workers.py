"""The lifecycle of DataLoader worker processes in a training run: how they start, end and die.

Workers ignore the signals that stop a run (the main process saves and ends them), a worker's
death surfaces at the next batch as one line instead of mid-step, and workers still alive when
the interpreter exits are ended rather than left to hang it.
"""

from __future__ import annotations

import atexit
import weakref
from typing import Any, Iterator

from torch import Tensor

from zoo.errors import UserError


def worker_deaths_surface_at_the_next_batch() -> None:
    """Take back SIGCHLD from PyTorch's DataLoader handler, which raises 'DataLoader worker (pid N) is killed
    by signal' wherever the main process is when a worker dies (the out-of-memory killer): mid-step or
    mid-save, a traceback and no ``last/``. Without it the death surfaces at the next batch (the DataLoader
    checks its workers every 5 s while it waits), where :func:`one_line_errors` says it in one line and the
    training loop saves ``last/`` first. Another handler (not PyTorch's) is left alone."""
    import signal
    import threading

    if not hasattr(signal, "SIGCHLD") or threading.current_thread() is not threading.main_thread():
        return
    handler = signal.getsignal(signal.SIGCHLD)
    if getattr(handler, "__module__", None) == "torch.utils.data._utils.signal_handling":
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)


def workers_ignore_stop_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: a worker ignores the signals that stop a run (SIGINT, SIGTERM, SIGHUP,
    SIGUSR1/2). A terminal's Ctrl-C or hang-up, torchrun and SLURM signal the whole process group; a worker
    that died of it made the main process's save on that signal fail ('DataLoader worker exited
    unexpectedly'). The main process ends its workers (see :func:`ended_at_exit`).

    A stop that lands while the main process receives a batch's shared-memory handle cuts the connection
    the worker's resource-sharer thread serves it on: that thread's ConnectionResetError (a traceback
    between the command's lines) is dropped, as the stop already says what happened."""
    import signal
    import threading

    from zoo.training.signals import STOPS_A_RUN

    for sig in STOPS_A_RUN:
        signal.signal(sig, signal.SIG_IGN)
    report = threading.excepthook

    def quiet_when_the_reader_left(args: threading.ExceptHookArgs) -> None:
        if not (issubclass(args.exc_type, (ConnectionResetError, BrokenPipeError))
                and _raised_in(args.exc_traceback, "resource_sharer.py")):
            report(args)

    threading.excepthook = quiet_when_the_reader_left


def _raised_in(tb: Any, file_name: str) -> bool:
    """Whether traceback ``tb`` passes through a file called ``file_name``."""
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.endswith(file_name):
            return True
        tb = tb.tb_next
    return False


_LIVE_WORKERS: "weakref.WeakSet" = weakref.WeakSet()  # DataLoader iterators with worker processes
_WORKER_PROCESSES: "weakref.WeakSet" = weakref.WeakSet()  # their processes (multiprocessing holds them while alive)


def ended_at_exit(it: Iterator) -> Iterator:
    """``it``, a DataLoader iterator, whose workers are ended when the interpreter exits if they are still alive then.

    Workers that ignore SIGTERM (:func:`workers_ignore_stop_signals`) outlive multiprocessing's own exit
    handler, which terminates and then joins them: a process holding a Trainer (or an error's traceback
    holding its data stream) hung at exit. This exit handler, registered after multiprocessing's and so
    run before it, asks them to end the DataLoader's own way, and kills those that did not.
    """
    if hasattr(it, "_shutdown_workers"):  # a multiprocessing iterator (num_workers > 0)
        if not _LIVE_WORKERS and not _WORKER_PROCESSES:
            atexit.register(_end_live_workers)  # once per process is enough; a second is harmless
        _LIVE_WORKERS.add(it)
        _WORKER_PROCESSES.update(getattr(it, "_workers", ()))
    return it


def end_workers(it: Iterator) -> None:
    """End the worker processes of DataLoader iterator ``it`` now (nothing for a single-process one).

    The DataLoader's own shutdown sends each worker a stop and, after 5 s, SIGTERM, which these
    workers ignore. That stop can also be lost: when the garbage collector frees an iterator caught
    in a reference cycle (an error's traceback), multiprocessing closes its queues before the
    DataLoader sends the stop, and the idle worker waited for it until the interpreter's exit hung
    on it. A worker still alive after the DataLoader's shutdown is killed (it only reads data).
    """
    if hasattr(it, "_shutdown_workers"):
        try:
            it._shutdown_workers()  # also takes the workers off the DataLoader's SIGCHLD watch: a kill is not an error
        except RuntimeError:  # that watch, on a worker the system killed meanwhile: said by one_line_errors
            if dead_worker(it) is None:
                raise
        _kill_live(getattr(it, "_workers", ()))


def dead_worker(it: Iterator, wait: float = 0.0) -> str | None:
    """``pid N, killed by SIGKILL`` for a worker of DataLoader iterator ``it`` that died (the system's
    out-of-memory killer, say); ``None`` while they live or when ``it`` has none. ``wait``: seconds to
    give a dying worker to be reaped (its pipes close, which the caller saw, just before it exits)."""
    import signal
    import time

    workers = list(getattr(it, "_workers", ()))
    deadline = time.monotonic() + wait
    while True:
        for worker in workers:
            code = worker.exitcode
            if code:
                how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
                return f"pid {worker.pid}, {how}"
        if not workers or time.monotonic() >= deadline:
            return None
        time.sleep(0.02)


def _kill_live(processes) -> None:
    for w in list(processes):
        if w.is_alive():
            w.kill()
            w.join(timeout=5)


def _end_live_workers() -> None:
    for it in list(_LIVE_WORKERS):
        end_workers(it)
    _kill_live(_WORKER_PROCESSES)  # workers of iterators already freed whose stop was lost (see end_workers)


def one_line_errors(it: Iterator[tuple[Tensor, Tensor]]) -> Iterator[tuple[Tensor, Tensor]]:
    """The batches of ``it``; a ``UserError`` from a DataLoader worker is one line again.

    zoo's datasets send theirs whole (:mod:`zoo.training.worker_errors`); any other dataset's
    arrives as the worker's traceback text, of which the error's own last line is kept.
    The workers of ``it`` end when this generator ends: on an error, or when it is closed."""
    try:
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return
            except UserError as err:
                text = str(err)
                if "Traceback" not in text:
                    raise
                last = [line for line in text.splitlines() if line.strip()][-1]
                raise UserError(last.split(f"{type(err).__qualname__}: ", 1)[-1]) from None
            except Exception:  # a worker killed mid-run breaks the DataLoader's pipes (reset, EOF, ...)
                died = dead_worker(it, wait=2.0)
                if died is None:
                    raise
                raise UserError(f"a data-loading worker died ({died})",
                                suggestion="a worker killed by SIGKILL was most likely the system out of memory: "
                                "lower data.num_workers (0 reads in the training process) or free memory") from None
            yield batch
    finally:  # an error, the end, or close(): the workers end now, not whenever the iterator is freed
        end_workers(it)
