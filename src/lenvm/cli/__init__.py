"""The ``lenvm`` command line: :func:`main` is its entry point (the ``lenvm`` script and
``python -m lenvm.cli``); :mod:`lenvm.cli.commands` declares and runs the commands.

This module imports no more than its signal handling needs, and :func:`main` sets that up before
it loads the commands (and with them, for most, torch and transformers: a second or more), so
that Ctrl-C or SIGTERM from the first moment ends a command as it ends one running: with its
cleanup and a line, never a traceback, and then, as the process's command line, by that signal.
A command whose stdout its reader closed (``| head``) ends quietly, and likewise by SIGPIPE.
"""

from __future__ import annotations

import atexit
import codecs
import contextlib
import importlib
import io
import json
import os
import signal
import sys
from collections.abc import Iterator


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the run is so that it ends as Ctrl-C ends it."""


# The signals whose exit status (128 + the number) a command returns when they ended it: the
# interrupts, and a closed stdout (SIGPIPE, which Python ignores and turns into BrokenPipeError).
_ENDING_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGPIPE") if hasattr(signal, name)
)


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """SIGTERM ends the command as Ctrl-C does, cleanup included (by default it kills the process
    at once: a run stopped while its model loads would leave the empty output file its lock
    created). A SIGTERM ignored by whoever started us stays ignored."""
    previous = signal.getsignal(signal.SIGTERM) or signal.SIG_DFL  # None: set outside Python
    if previous is signal.SIG_IGN:
        yield
        return
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def interrupted(interrupt: KeyboardInterrupt, resumes: bool = False) -> int:
    """Say that the command was interrupted (and that running it again resumes it, where it
    ``resumes``); the exit status, as a shell reports a process ended by the signal: 128 + its
    number."""
    hint = "; run the same command again to resume" if resumes else ""
    print(f"lenvm: interrupted{hint}", file=sys.stderr)
    return 128 + (signal.SIGTERM if isinstance(interrupt, Terminated) else signal.SIGINT)


def _json_escapes(error: UnicodeError) -> tuple[str, int]:
    """An encoding error handler: the characters that the encoding lacks as JSON escapes them,
    ``\\u00fc`` (two past U+FFFF), which read as backslashreplace's do and keep JSON lines JSON."""
    if not isinstance(error, UnicodeEncodeError):
        raise error
    return json.dumps(error.object[error.start : error.end])[1:-1], error.end


codecs.register_error(_JSON_ESCAPES := "lenvm.json_escapes", _json_escapes)


@contextlib.contextmanager
def _unencodable_as_escapes() -> Iterator[None]:
    """stdout and stderr write a character that their encoding lacks (a prompt's text on an ASCII
    or cp1252 console) as a JSON escape rather than fail with a traceback once the work is done;
    then as they were."""
    changed = [
        stream
        for stream in (sys.stdout, sys.stderr)
        if isinstance(stream, io.TextIOWrapper) and stream.errors == "strict"
    ]
    for stream in changed:
        stream.reconfigure(errors=_JSON_ESCAPES)
    try:
        yield
    finally:
        for stream in changed:
            with contextlib.suppress(OSError, ValueError):  # its reader gone, or closed
                stream.reconfigure(errors="strict")


def main(argv: list[str] | None = None) -> int:
    """Run the command ``argv``; its exit status.

    With ``argv`` left out, the command is the process's own (the ``lenvm`` script, ``python -m
    lenvm.cli``), and one interrupted by SIGINT or SIGTERM ends the process by that signal once its
    cleanup and the interpreter's exit handlers have run, as Python ends on a Ctrl-C it does not
    catch: a shell still reports 130 or 143, a shell script stops as on Ctrl-C (an exit status of
    130 tells it the command handled the signal), and a supervisor such as systemd sees a stop by
    its signal, not a failure. One whose stdout was closed by its reader (``| head``) ends by
    SIGPIPE likewise, as a C tool does: a shell reports 141 and says nothing. ``main(argv)`` returns
    these statuses (128 + the signal's number) and ends nothing; it returns those of ``--help``,
    ``--version`` (0) and a usage error (2) too, never raising SystemExit, and leaves the settings
    a command changes while it runs (transformers' logging and progress bars, how warnings are
    printed, how stdout and stderr write what their encoding lacks) as they were, so that it can
    run in a notebook's process."""
    ended_by: list[int] = []
    if argv is None:
        atexit.register(_end_by_signal, ended_by)  # the first exit handler: the last to run
    with _unencodable_as_escapes(), sigterm_interrupts():
        try:
            from lenvm.cli.commands import run

            status = run(sys.argv[1:] if argv is None else argv)
        except KeyboardInterrupt as interrupt:  # before the command began: it has written nothing
            status = interrupted(interrupt)
    if status - 128 in _ENDING_SIGNALS:
        ended_by.append(status - 128)
    return status


def __getattr__(name: str) -> object:
    """The public functions of :mod:`lenvm.cli.commands` (``build_parser``, ``cmd_train``, ...),
    importable from here too; the commands load when one is first asked for, so that the entry
    point stays light."""
    if not name.startswith("_"):
        commands = importlib.import_module("lenvm.cli.commands")  # ``from lenvm.cli import`` would ask here
        found = getattr(commands, name, None)
        if getattr(found, "__module__", None) == commands.__name__:
            return found
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _end_by_signal(ended_by: list[int]) -> None:
    """End the process by the signal that ended its command, if one did (POSIX only: elsewhere the
    exit status says it)."""
    if not ended_by or os.name != "posix":
        return
    for stream in (sys.stdout, sys.stderr):  # the interpreter would flush them after this handler
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    signal.signal(ended_by[0], signal.SIG_DFL)
    os.kill(os.getpid(), ended_by[0])
