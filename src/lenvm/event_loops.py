"""Running what starts an event loop of its own (``asyncio.run``, a uvicorn server) from a thread
that may run one already: a notebook's kernel does, and asyncio refuses to start a second loop in
such a thread (``asyncio.run() cannot be called from a running event loop``).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import TypeVar

T = TypeVar("T")

# How often the waiting thread wakes: where a lock's wait cannot be interrupted (Windows), an
# interrupt is raised at the next wake.
_WAKE_S = 0.1
# How long a second interrupt waits for ``run`` to end after its second ``stop``.
_SECOND_WAIT_S = 5.0


def run_own_loop(run: Callable[[], T], stop: Callable[[], None]) -> T:
    """``run()``, which runs an event loop of its own: in this thread, or, where this thread runs
    a loop already, in a worker thread while this one waits. An interrupt that reaches the waiting
    thread (Ctrl-C, SIGTERM under :func:`lenvm.cli.main`) calls ``stop``, which must be safe to
    call from a thread other than ``run``'s and make ``run`` end soon, waits for that end and is
    raised again, as it would have been had ``run`` run in this thread. A second interrupt during
    that wait calls ``stop`` again, which must end ``run`` at once (the server answers its
    requests in flight with an error), and is raised once ``run`` has ended, or after
    ``_SECOND_WAIT_S`` (a script's process would end before those answers were sent); a third is
    raised at once, leaving ``run`` to end in its thread."""
    if not _loop_running():
        return run()  # outside an except block, whose RuntimeError every exception of run would chain
    outcome: Future[T] = Future()
    ended = threading.Event()

    def work() -> None:
        try:
            outcome.set_result(run())
        except BaseException as err:  # the caller's to see, raised again in its thread
            outcome.set_exception(err)
        finally:
            ended.set()

    worker = threading.Thread(target=work, name="lenvm-event-loop", daemon=True)
    with _ctrl_c_interrupts():
        try:
            worker.start()
            _wait(ended)
        except KeyboardInterrupt:
            stop()
            try:
                _wait(ended)
            except KeyboardInterrupt:
                stop()
                with contextlib.suppress(KeyboardInterrupt):  # a third: no more waiting
                    _wait(ended, _SECOND_WAIT_S)
                raise
            raise
    return outcome.result()


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _wait(ended: threading.Event, timeout: float = float("inf")) -> None:
    # Not Thread.join: on CPython before 3.13 an interrupted join marks the thread as ended, and
    # a second join then returns at once while it still runs.
    deadline = time.monotonic() + timeout
    while not ended.wait(_WAKE_S) and time.monotonic() < deadline:
        pass


@contextlib.contextmanager
def _ctrl_c_interrupts() -> Iterator[None]:
    """Ctrl-C raises KeyboardInterrupt in the waiting thread, where the loop running there
    installed a handler of its own: asyncio.run's, and ipykernel's in a cell run as a coroutine,
    only cancel a task of that loop, which cannot run while this thread waits, and so a first
    Ctrl-C would change nothing. Only the main thread receives signals; a SIGINT that is ignored,
    kills, or is handled outside Python stays so."""
    previous = signal.getsignal(signal.SIGINT)
    # not callable: ignored, the default (death), or set outside Python
    if threading.current_thread() is not threading.main_thread() or not callable(previous):
        yield
        return
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
