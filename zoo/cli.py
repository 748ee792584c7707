"""The ``zoo`` command line: one subcommand per module in ``zoo/commands/``.

Each module in :data:`COMMANDS` has ``register(subparsers)`` (adds its parser and sets
``func=run``) and ``run(args) -> int``. A :class:`~zoo.errors.UserError` (or a missing user
file, a full disk, a read-only file system) is printed as one line on stderr with exit status 2
and no traceback; set ``ZOO_TRACEBACK=1`` to see the traceback anyway. Ctrl-C exits with 130.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import errno
import importlib
import os
import sys
import threading
from typing import Any, NoReturn, Sequence

from .commands import refuse_torchrun
from .errors import UserError, tracebacks_wanted

QUIET_RANK_WAIT_S = 10.0  # how long a rank whose mistake rank 0 reports waits for rank 0 to print it

COMMANDS: tuple[str, ...] = ("list", "build", "convert", "parity", "sample", "train", "compare", "eval", "export",
                            "prepare_latents", "train_classifier")

# Commands whose work is the files they write, not what they print: a reader of their stdout that goes
# away (`zoo train ... | head -1`) must not end the work. What stderr says when it does:
GOES_ON_WITHOUT_STDOUT = {
    "train": "the run goes on, its records are in log.jsonl",
    "prepare-latents": "the encoding goes on",
    "eval": "the evaluation goes on, its result is in the JSON file it writes",
    "sample": "sampling goes on",
    "train-classifier": "training goes on",
    "convert": "the conversion goes on",
    "export": "the export goes on",
}


def _broken_command(subparsers: argparse._SubParsersAction, name: str, err: Exception) -> None:
    """Keep a command that fails to import from taking the others down: running it re-raises."""

    def run(args: argparse.Namespace) -> int:
        raise err

    p = subparsers.add_parser(name, help=f"(unavailable: {type(err).__name__}: {err})", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=run)


def _int_at_least(text: str, lowest: int, words: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < lowest:
        raise argparse.ArgumentTypeError(f"{value} {words}")
    return value


def positive_int(text: str) -> int:
    """An argparse ``type`` for counts (steps, batches, repeats): argparse's one-line usage error
    instead of an empty table or a traceback from deep inside for 0 or a negative number."""
    return _int_at_least(text, 1, "is not a positive integer")


def positive_float(text: str) -> float:
    """An argparse ``type`` for rates and scales (a learning rate): argparse's one-line usage error for
    0, a negative number, nan or inf, which otherwise crash deep inside or train to NaN."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"{text} is not a positive finite number")
    return value


def non_negative_int(text: str) -> int:
    """An argparse ``type`` for counts that may be 0 (warm-up steps)."""
    return _int_at_least(text, 0, "is negative")


class OneLineParser(argparse.ArgumentParser):
    """argparse with its usage errors as one line (``zoo: error: ...``), like every other zoo error; the
    usage it printed above them (up to six lines) is one ``--help`` away."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix("zoo").strip()
        self.exit(2, f"zoo: error: {command + ': ' if command else ''}{_one_line(message)} "
                     f"(`{self.prog} --help` shows the usage)\n")


class _VersionAction(argparse.Action):
    """``zoo --version``: zoo's and torch's installed versions, read from their metadata when asked
    (``import torch`` would cost seconds)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> NoReturn:
        from importlib import metadata

        import zoo

        try:
            torch_version = metadata.version("torch")
        except metadata.PackageNotFoundError:
            torch_version = "not installed"
        print(f"zoo {zoo.__version__} (torch {torch_version}, Python {sys.version.split()[0]})")
        parser.exit(0)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="zoo", description="A registry-driven architecture zoo for diffusion backbones (DiMR, U-ViT, DiT)."
    )
    parser.add_argument("--version", action=_VersionAction, help="show zoo's and torch's versions and exit")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"zoo.commands.{name}")
        except Exception as err:
            _broken_command(subparsers, name, err)
            continue
        module.register(subparsers)
    return parser


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _unrecognized(extra: Sequence[str]) -> str:
    """argparse's 'unrecognized arguments', plus the fix when they are overrides without their ``--set``
    (``--set a=1 b=2``: each KEY=VALUE takes its own ``--set``)."""
    message = f"unrecognized arguments: {' '.join(extra)}"
    loose = [arg for arg in extra if "=" in arg and not arg.startswith("-")]
    if loose:
        message += " (each override takes its own --set: " + " ".join(f"--set {arg}" for arg in loose) + ")"
    return message


PATH_PROBLEMS = {  # an OS error on a path the user gave, in words, with what to do
    PermissionError: "no permission to read or write this path (choose another or change its permissions)",
    IsADirectoryError: "a directory where a file is needed (give a file's path)",
    NotADirectoryError: "a file where a directory is needed (give a directory, or a path that does not exist yet)",
}


def _disk_problem(err: OSError) -> str:
    """A full or read-only disk in words, naming what was being written (zoo's writes are atomic:
    a file is written under a temporary name and renamed, so nothing half-written is left)."""
    import errno

    what = f"{err.filename}: " if err.filename else ""
    if err.errno == errno.EROFS:
        return f"{what}the file system is read-only (write somewhere else)"
    if err.errno == errno.EFBIG:
        return (f"{what}the file would be larger than this process may write (a file size limit: `ulimit -f`, or "
                "the file system's largest file), so it was not written (nothing half-written is left)")
    full = "your disk quota is used up" if err.errno == getattr(errno, "EDQUOT", None) else "the disk is full"
    if not err.filename:
        return f"{full} ({err.strerror}; free some space, or write somewhere else)"
    return (f"{what}{full}, so it was not written (nothing half-written is left; free some space, "
            "or write somewhere else)")


def _empty_argument(argv: Sequence[str], parser: argparse.ArgumentParser) -> str | None:
    """The option given an empty value (``--out ""``, ``--vae=``), or the positional argument that is
    empty (``RECIPE``); ``None`` if none is empty. argparse takes them, and a path that is empty is the
    working directory: ``--out ""`` wrote shards there, ``zoo train --out ""`` its default run."""
    for i, arg in enumerate(argv):
        if arg.startswith("--") and arg.endswith("=") and len(arg) > 3:
            return arg[:-1]
        if arg == "":
            return _argument_at(parser, list(argv[:i]))
    return None


def _argument_at(parser: argparse.ArgumentParser, before: list[str]) -> str:
    """What the argument after ``before`` is: the option before it if that takes a value (``--out``; not
    ``--fp64``, a switch), else the positional it fills, by its metavar (``RECIPE``), else "an argument"."""
    positionals = [a for a in parser._actions if not a.option_strings]
    filled, option, values = 0, None, 0  # option: the one whose values come next (values of them left)
    for i, arg in enumerate(before):
        if values:
            values -= 1
            continue
        if arg.startswith("-") and len(arg) > 1 and not arg.lstrip("-").replace(".", "").isdigit():
            action = _option_action(parser, arg)  # an unknown option: taken as one that takes a value
            takes = 1 if action is None else {None: 1, "?": 1, "*": 1 << 30, "+": 1 << 30}.get(action.nargs,
                                                                                                action.nargs)
            option, values = (arg, int(takes)) if "=" not in arg else (None, 0)
            continue
        option = None
        if filled < len(positionals):
            current = positionals[filled]
            if isinstance(current, argparse._SubParsersAction) and arg in current.choices:
                return _argument_at(current.choices[arg], before[i + 1:])
            filled += current.nargs not in ("*", "+", argparse.REMAINDER)
    if option is not None and values:
        return option
    if filled < len(positionals):
        return positionals[filled].metavar or positionals[filled].dest.upper()
    return "an argument"


def _option_action(parser: argparse.ArgumentParser, arg: str) -> argparse.Action | None:
    """The option ``arg`` names (``--out``, ``--out=DIR``, or an unambiguous prefix as argparse takes), if any."""
    name = arg.split("=", 1)[0]
    found = {a for s, a in parser._option_string_actions.items() if s == name} or \
        {a for s, a in parser._option_string_actions.items() if s.startswith(name) and name.startswith("--")}
    return found.pop() if len(found) == 1 else None


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``zoo ARGS``; return the exit status."""
    try:
        parser = build_parser()
        given = sys.argv[1:] if argv is None else list(argv)
        empty = _empty_argument(given, parser)
        if empty is not None:
            print(f"zoo: error: {empty} is empty (give a value)", file=sys.stderr)
            return 2
        try:
            args, extra = parser.parse_known_args(argv)
        except SystemExit as exit_:  # --help, or a usage error already printed by argparse
            return exit_.code if isinstance(exit_.code, int) else 2
        if extra:
            print(f"zoo: error: {_unrecognized(extra)}", file=sys.stderr)
            return 2
        refuse_torchrun(args.command, given)  # a one-process command: before any of its work
        if args.command not in GOES_ON_WITHOUT_STDOUT:
            return int(args.func(args) or 0)
        stdout, stderr = sys.stdout, sys.stderr
        sys.stdout = _ReaderMayLeave(stdout, f"zoo {args.command}: stdout was closed; "
                                             f"{GOES_ON_WITHOUT_STDOUT[args.command]}")
        sys.stderr = _ReaderMayLeave(stderr, None)  # the progress bar's stream: a closed terminal's too
        try:
            return int(args.func(args) or 0)
        finally:
            sys.stdout, sys.stderr = stdout, stderr
    except KeyboardInterrupt as err:  # Ctrl-C; zoo train's StopRequested also after SIGTERM (status 143)
        status = getattr(err, "exit_status", 130)
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank stops alike: one line says so
            with contextlib.suppress(OSError):  # a hung-up terminal (SIGHUP) has nowhere to show it
                print("zoo: interrupted" if status == 130 and not str(err).startswith("interrupted")
                      else f"zoo: {err}", file=sys.stderr)
        return status
    except (UserError, FileNotFoundError) as err:
        if tracebacks_wanted():
            raise
        if getattr(err, "quiet", False):  # rank 0 of the run prints it
            # ... unless torchrun, seeing this rank fail first, ends rank 0 before it has printed:
            # then the user saw no message at all. torchrun ends this wait when rank 0 exits.
            import time

            time.sleep(QUIET_RANK_WAIT_S)
            return 2
        if isinstance(err, FileNotFoundError):
            message = f"file not found: {err.filename}" if err.filename else str(err)
        else:
            message = str(err)
        print(f"zoo: error: {_one_line(message)}", file=sys.stderr)
        return 2
    except (PermissionError, IsADirectoryError, NotADirectoryError) as err:
        if tracebacks_wanted() or not err.filename:  # no path named: not a user's path, a bug
            raise
        print(f"zoo: error: {err.filename}: {PATH_PROBLEMS[type(err)]}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `zoo list | head -1`: the reader has all it wanted
        _discard(sys.stdout)
        return 0
    except OSError as err:  # a full or read-only disk: not a bug, nothing to fix in what was given but where
        from zoo.atomic import DISK_ERRNOS

        if tracebacks_wanted() or err.errno not in DISK_ERRNOS:
            raise
        print(f"zoo: error: {_disk_problem(err)}", file=sys.stderr)
        return 2


def _discard(stream) -> None:
    """Point ``stream``'s file descriptor (stdout, stderr) at /dev/null, so that flushing what is still
    buffered at exit cannot fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, stream.fileno())
    os.close(devnull)


#: a write's errno when its reader has gone: a closed pipe (``| head``), or a terminal that hung up (EIO)
READER_GONE = (errno.EPIPE, errno.EIO)


class _ReaderMayLeave:
    """``sys.stdout`` (or ``sys.stderr``) of a long command: once its reader has gone (a broken pipe, a
    closed terminal), what it prints goes to /dev/null and the work goes on, with one ``note`` on stderr,
    instead of the run ending unsaved (a terminal's hang-up asks zoo train to save: its next line failed)."""

    def __init__(self, stream, note: str | None) -> None:
        self._stream, self._note = stream, note

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError as err:
            if err.errno not in READER_GONE:
                raise
            self._reader_left()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as err:
            if err.errno not in READER_GONE:
                raise
            self._reader_left()

    def _reader_left(self) -> None:
        _discard(self._stream)
        with contextlib.suppress(OSError, ValueError):
            self._stream.flush()  # what is still buffered goes to /dev/null now
        if self._note is not None:
            with contextlib.suppress(OSError, ValueError):
                print(self._note, file=sys.stderr, flush=True)
            self._note = None

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def _open_std_streams() -> None:
    """Give a closed stdin, stdout or stderr (``zoo list >&-``) /dev/null: Python leaves ``sys.stdout``
    None (an AttributeError at the first print), and the first file zoo opened would take fd 1, where
    torch's own writes to stdout would land in it. Text no encoding can show (``LC_ALL=C`` and a ``±``)
    is escaped rather than a UnicodeEncodeError after the work was done."""
    for fd, name in ((0, "stdin"), (1, "stdout"), (2, "stderr")):
        try:
            os.fstat(fd)
        except OSError:
            devnull = os.open(os.devnull, os.O_RDWR)
            if devnull != fd:
                os.dup2(devnull, fd)
                os.close(devnull)
        if getattr(sys, name) is None:
            setattr(sys, name, open(fd, "r" if fd == 0 else "w", closefd=False, encoding="utf-8"))
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")


def console_main() -> None:
    """Entry point of the ``zoo`` console script: ``main()``, then exit with its status.

    Output piped into a reader that closes early (``zoo list | head -1``) ends quietly with
    status 0: a pipe's buffered output is written only here, at the final flush.
    """
    _open_std_streams()
    code = main()
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _discard(sys.stdout)
        code = 0
    _exit_without_teardown(code)


def _exit_without_teardown(code: int) -> NoReturn:
    """End the process as the interpreter would, less its teardown: wait for the threads it would wait
    for, run the atexit handlers (data workers, logging, compile workers), flush, exit with ``code``.

    Garbage-collecting torch's and the model's objects module by module costs 0.5-2 s at the end
    of every command (of `zoo build --flops`, of each torchrun worker) and writes nothing: every
    file zoo writes is closed, and renamed into place, before ``main`` returns.
    """
    # What the interpreter does first at exit: tell pools to stop (concurrent.futures' workers, which
    # inductor starts on a cold compile, are non-daemon threads that end only when told), then join the
    # non-daemon threads; joining them without the telling waited forever after `zoo train` said done.
    shutdown = getattr(threading, "_shutdown", None)
    if shutdown is not None:
        shutdown()
    else:  # pragma: no cover - every CPython 3.10-3.14 has it
        import concurrent.futures.thread

        concurrent.futures.thread._python_exit()
        for thread in threading.enumerate():
            if thread is not threading.main_thread() and not thread.daemon:
                thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()  # (never None: console_main opened /dev/null for a closed one)
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can reach it
            pass
    os._exit(code)


if __name__ == "__main__":
    console_main()
