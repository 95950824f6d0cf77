"""run_own_loop from a thread that runs an event loop (a notebook's kernel, a script's asyncio.run):
an interrupt stops what runs in the worker thread and waits for its end."""

import asyncio
import contextlib
import signal
import threading
import time

import pytest

from lenvm.event_loops import run_own_loop


@pytest.fixture(autouse=True)
def ctrl_c_raises():
    """Ctrl-C raises KeyboardInterrupt, as in a kernel or a terminal, however pytest was started
    (in the background by a shell, SIGINT comes ignored: lenvm keeps that, so nothing here would
    be tested)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


class SlowToStop:
    """A ``run`` that runs until stopped and then takes ``shutdown_s`` to end, as a server lets
    its requests in flight finish; ``stop`` only asks, as uvicorn's handle_exit does. A second
    ``stop`` ends it at once, as the server then answers its requests with an error, unless
    ``stuck``."""

    def __init__(self, shutdown_s: float = 0.3, gives_up_s: float = 5.0, stuck: bool = False) -> None:
        self.shutdown_s, self.gives_up_s, self.stuck = shutdown_s, gives_up_s, stuck
        self.started, self.stopping, self.ended = threading.Event(), threading.Event(), threading.Event()
        self.cut = threading.Event()
        self.stops = 0

    def run(self) -> str:
        self.started.set()
        stopped = self.stopping.wait(self.gives_up_s)  # a bound, so that a failing test ends
        self.cut.wait(self.shutdown_s)
        self.ended.set()
        return "stopped" if stopped else "never stopped"

    def stop(self) -> None:
        self.stops += 1
        self.stopping.set()
        if self.stops == 2 and not self.stuck:
            self.cut.set()


@contextlib.contextmanager
def ctrl_c(after: threading.Event, times: int = 1):
    """Ctrl-C in the main thread, ``times`` times, once ``after`` is set; all of them within the
    block, so that none interrupts the next test."""

    def press() -> None:
        after.wait(5)
        for _ in range(times):
            time.sleep(0.1)
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    thread = threading.Thread(target=press, daemon=True)
    thread.start()
    try:
        yield
    finally:
        thread.join()


def in_a_running_loop(call):
    """``call()`` from a coroutine of a loop run as a notebook's kernel runs one, with no SIGINT
    handler of asyncio's."""

    async def cell():
        return call()

    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(cell())
    finally:
        loop.close()


def test_an_interrupt_waits_for_a_slow_stop_to_end_the_run():
    work = SlowToStop()
    with pytest.raises(KeyboardInterrupt), ctrl_c(after=work.started):
        in_a_running_loop(lambda: run_own_loop(work.run, work.stop))
    assert work.ended.is_set() and work.stops == 1


def test_a_second_interrupt_ends_the_run_and_returns_once_it_has_ended():
    """As a script under asyncio.run would end its process before the server's answers were sent
    if the call returned at once."""
    work = SlowToStop(shutdown_s=30.0)
    began = time.monotonic()
    with pytest.raises(KeyboardInterrupt), ctrl_c(after=work.started, times=2):
        in_a_running_loop(lambda: run_own_loop(work.run, work.stop))
    assert time.monotonic() - began < 2.0 and work.ended.is_set() and work.stops == 2


def test_a_third_interrupt_abandons_the_wait():
    work = SlowToStop(shutdown_s=3.0, stuck=True)
    began = time.monotonic()
    with pytest.raises(KeyboardInterrupt), ctrl_c(after=work.started, times=3):
        in_a_running_loop(lambda: run_own_loop(work.run, work.stop))
    assert time.monotonic() - began < 2.0 and not work.ended.is_set() and work.stops == 2


def test_one_ctrl_c_under_asyncio_run_ends_it():
    """asyncio.run's SIGINT handler only cancels its main task, which waits here and cannot run:
    the first Ctrl-C must still stop the run, and asyncio's handler is back afterwards."""
    work = SlowToStop(shutdown_s=0.0, gives_up_s=2.0)
    handlers = []

    async def script():
        handlers.append(signal.getsignal(signal.SIGINT))
        try:
            return run_own_loop(work.run, work.stop)
        finally:
            handlers.append(signal.getsignal(signal.SIGINT))

    with pytest.raises(KeyboardInterrupt), ctrl_c(after=work.started):
        asyncio.run(script())
    assert work.stops == 1 and handlers[0] is handlers[1] is not signal.default_int_handler


def test_without_a_running_loop_run_runs_in_this_thread():
    assert run_own_loop(lambda: threading.current_thread().name, lambda: None) == "MainThread"


def test_what_run_raises_is_raised_in_the_calling_thread():
    def run():
        raise ValueError("bad")

    with pytest.raises(ValueError, match="bad"):
        in_a_running_loop(lambda: run_own_loop(run, lambda: None))


def test_what_run_raises_without_a_running_loop_chains_nothing():
    """Not "During handling of the above exception (no running event loop)" before every
    traceback of what run raises or logs."""

    def run():
        try:
            raise ValueError("bad")
        except ValueError as err:
            return err

    assert run_own_loop(run, lambda: None).__context__ is None
