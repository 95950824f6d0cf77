"""The ``lenvm`` command line: :func:`main` is its entry point (the ``lenvm`` script and
``python -m lenvm.cli``); :mod:`lenvm.cli.commands` declares and runs the commands.

This module imports no more than its signal handling needs, and :func:`main` sets that up before
it loads the commands (and with them, for most, torch and transformers: a second or more), so
that Ctrl-C or SIGTERM from the first moment ends a command as it ends one running: with a line
and status 130 or 143, never a traceback or death by the signal.
"""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Iterator


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the run is so that it ends as Ctrl-C ends it."""


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


def main(argv: list[str] | None = None) -> int:
    """Run the command ``argv`` (by default the process's arguments); its exit status."""
    with sigterm_interrupts():
        try:
            from lenvm.cli.commands import run

            return run(sys.argv[1:] if argv is None else argv)
        except KeyboardInterrupt as interrupt:  # before the command began: it has written nothing
            return interrupted(interrupt)
