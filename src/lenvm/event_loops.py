"""Running what starts an event loop of its own (``asyncio.run``, a uvicorn server) from a thread
that may run one already: a notebook's kernel does, and asyncio refuses to start a second loop in
such a thread (``asyncio.run() cannot be called from a running event loop``).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

T = TypeVar("T")


def run_own_loop(run: Callable[[], T], stop: Callable[[], None]) -> T:
    """``run()``, which runs an event loop of its own: in this thread, or, where this thread runs
    a loop already, in a worker thread while this one waits. An interrupt that reaches the waiting
    thread (Ctrl-C, SIGTERM under :func:`lenvm.cli.main`) calls ``stop``, which must be safe to
    call from a thread other than ``run``'s and make ``run`` end soon, waits for that end and is
    raised again, as it would have been had ``run`` run in this thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return run()
    outcome: Future[T] = Future()

    def work() -> None:
        try:
            outcome.set_result(run())
        except BaseException as err:  # the caller's to see, raised again in its thread
            outcome.set_exception(err)

    worker = threading.Thread(target=work, name="lenvm-event-loop", daemon=True)
    worker.start()
    try:
        worker.join()
    except KeyboardInterrupt:
        stop()
        worker.join()
        raise
    return outcome.result()
