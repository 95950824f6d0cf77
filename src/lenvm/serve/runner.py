"""The decoding engine's loop on one background thread, shared by every request of the server.

The server's handlers run on an asyncio event loop; the engine's torch work must not. One thread
owns the engine's :class:`~lenvm.decoding.Scheduler` and steps it while there is work. Handlers
hand it commands through a thread-safe queue (add a request's choices, abort them, run a function
between two steps: the length endpoints) and get each choice's new tokens back through an asyncio
queue per request, as the engine chooses them. A request that arrives joins the running batch at
the next step (continuous batching); an aborted one leaves it at once. While rows decode, the
queued functions take turns with the steps, one between two steps, so that any number of length
requests delays each step by one function's work at most.

Each choice is followed by a tracker that turns the engine's updates into text: it decodes each
new token after the ones before (``detokenizer``), ends the choice at the first stop string (and
aborts its row), and holds back the tokens whose text could still become a stop string and those
that add no text yet (the pieces of a character not yet complete): a token goes out with its text,
and text only with its tokens. A choice whose end the engine may go back on (retries,
``best_of``) is *held*: it reports nothing until its answer is final, then all of it at once.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Hashable, Iterator
from dataclasses import dataclass
from typing import Any, cast

from lenvm.decoding import Request, Result, Scheduler
from lenvm.decoding.engine import Engine, Update
from lenvm.decoding.params import RequestError
from lenvm.io import InputError
from lenvm.serve.detokenizer import AnswerDecoder
from lenvm.serve.metrics import Metrics

log = logging.getLogger("lenvm.serve")

IDLE_POLL_S = 0.5  # how often an idle engine thread looks up from its queue to check for a stop


class QueueFull(Exception):
    """The server holds as many requests as it may; try again later (HTTP 429)."""


class ShuttingDown(Exception):
    """The server is shutting down and takes no more work, or cut this request short (HTTP 503)."""


class EngineFailure(Exception):
    """A decoding step failed; the requests in the batch were answered with this error and the
    engine goes on with a fresh batch (HTTP 500)."""


@dataclass(frozen=True)
class Choice:
    """One answer to generate: the engine's request and the server's own settings for it."""

    request: Request
    stops: tuple[str, ...] = ()  # the answer ends before the first of these strings
    include_stop: bool = False  # ... or with it (vLLM's include_stop_str_in_output)

    @property
    def rows(self) -> int:
        """Batch rows the answer may take at once: one per ``best_of`` attempt."""
        return self.request.attempts

    @property
    def held(self) -> bool:
        """The engine may go back on this answer's end (retries, best_of): report it only whole."""
        control = self.request.control
        return control is not None and (control.max_retries > 0 or control.best_of > 1)


@dataclass(frozen=True)
class Finish:
    """How a choice ended. ``reason`` is OpenAI's ``finish_reason``: ``"stop"`` (an EOS, the
    policy's or a hard cap's, or a stop string) or ``"length"`` (``max_tokens``)."""

    reason: str
    stop_string: str | None  # the stop string that ended the answer
    completion_tokens: int  # tokens of the answer returned, EOS included
    discarded_tokens: int  # tokens decoded for it and thrown away (retries, other best_of attempts)
    num_tokens: int  # EOS excluded
    retries: int
    eos_prob: float | None
    capped: bool  # a hard cap forced the EOS

    @classmethod
    def of(cls, result: Result) -> Finish:
        returned = len(result.token_ids)
        return cls(
            reason="length" if result.finish_reason == "length" else "stop",
            stop_string=None,
            completion_tokens=returned,
            discarded_tokens=result.decoded_tokens - returned,
            num_tokens=result.num_tokens,
            retries=result.retries,
            eos_prob=result.eos_prob,
            capped=result.finish_reason == "cap",
        )


@dataclass(frozen=True)
class Chunk:
    """What one choice got since its last chunk; ``finish`` is set on its last one."""

    index: int
    token_ids: list[int]
    text: str
    pieces: list[str]  # what each token adds to the answer's text (see ``detokenizer``)
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]] | None
    values: list[float] | None
    finish: Finish | None = None


_ACCEPTED = object()


class Submission:
    """One HTTP request's choices in the engine, and the queue their chunks arrive on."""

    def __init__(self, choices: list[Choice], keys: list[int], loop: asyncio.AbstractEventLoop):
        self.choices = choices
        self.keys = keys
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()

    def put(self, item: Any) -> None:
        """From the engine thread."""
        with contextlib.suppress(RuntimeError):  # a closed event loop: nobody is waiting any more
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    async def accepted(self) -> None:
        """Wait until the engine took every choice; raise what it found wrong with them."""
        item = await self.queue.get()
        if item is not _ACCEPTED:
            raise item

    async def chunks(self) -> AsyncIterator[Chunk]:
        """Every choice's chunks as they come, until each choice has finished."""
        finished = 0
        while finished < len(self.keys):
            item = await self.queue.get()
            if isinstance(item, BaseException):
                raise item
            finished += item.finish is not None
            yield item


class EngineRunner:
    """Drives one engine's scheduler from a background thread (see the module doc).

    At most ``batch_size`` choices decode at once and ``max_waiting`` more wait for a row; a
    submission beyond that raises :class:`QueueFull`. A length request takes one of those places
    while it runs (:meth:`place`)."""

    def __init__(
        self, engine: Engine, batch_size: int = 16, max_waiting: int = 256, metrics: Metrics | None = None
    ):
        self.engine = engine
        self.batch_size = batch_size
        self.max_waiting = max_waiting
        self.metrics = metrics
        self.scheduler = Scheduler(engine, batch_size)
        self.accepting = True  # new requests are taken; the ones taken go on while this is False
        self._cut: BaseException | None = None  # set: what answers the requests still in flight
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        # rows the unfinished choices may take (running or waiting), and one per length request
        self._outstanding = 0
        self._keys = itertools.count()
        self._live: dict[Hashable, tuple[Submission, _Tracker]] = {}  # engine thread only
        self._calls: deque[tuple] = deque()  # functions to run between steps; engine thread only
        self._thread: threading.Thread | None = None

    # -- from the event loop --------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return self.batch_size + self.max_waiting

    @property
    def outstanding(self) -> int:
        return self._outstanding

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="lenvm-engine", daemon=True)
        self._thread.start()

    def submit(self, choices: list[Choice]) -> Submission:
        """Queue ``choices`` (from a coroutine); their chunks come back on the submission."""
        if not self.accepting:
            raise ShuttingDown("the server is shutting down")
        self._reserve(sum(c.rows for c in choices))  # best_of attempts each hold a row
        submission = Submission(choices, [next(self._keys) for _ in choices], asyncio.get_running_loop())
        self._inbox.put(("add", submission))
        return submission

    @contextlib.contextmanager
    def place(self) -> Iterator[None]:
        """Hold one place of the batch and queue while a length request runs, or raise
        :class:`QueueFull`: many length requests at once are refused as many answers are."""
        self._reserve(1)
        try:
            yield
        finally:
            self._release(1)

    def _reserve(self, places: int) -> None:
        with self._lock:
            if self._outstanding + places > self.capacity:
                raise QueueFull(
                    f"the server is full ({self._outstanding} rows' worth of answers and length requests "
                    "running or waiting); try again later"
                )
            self._outstanding += places

    def cancel(self, submission: Submission) -> None:
        """Drop a submission's unfinished choices (the client went away); their rows free at once."""
        self._inbox.put(("abort", submission))

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the engine thread between two steps (torch work off the event loop, and
        never beside a step) and return its result. A request taken before a shutdown goes on
        calling until :meth:`abort_all` or :meth:`stop`; its caller refuses new requests."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._lock:  # checked and queued at once: a call queued after "stop" is never run
            if self._cut is not None:
                raise self._cut
            self._inbox.put(("call", fn, future, loop))
        return await future

    def abort_all(self, error: BaseException) -> None:
        """Answer every unfinished choice, every call not run yet and every later call with
        ``error`` (a shutdown that cannot wait longer)."""
        with self._lock:
            self._cut = error
            self._inbox.put(("fail", error))

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread; what is still unfinished is answered with :class:`ShuttingDown`."""
        self.accepting = False
        with self._lock:
            if self._cut is None:
                self._cut = ShuttingDown("the server shut down before this request finished")
            self._inbox.put(("stop",))
        if self._thread is not None:
            self._thread.join(timeout)

    # -- the engine thread ----------------------------------------------------------------

    def _run(self) -> None:
        while True:
            try:
                for command in self._commands(block=not (self.scheduler.busy or self._calls)):
                    if command[0] == "stop":
                        error = ShuttingDown("the server shut down before this request finished")
                        self._fail(error)
                        self._fail_calls(error)
                        return
                    self._apply(command)
                if self._calls:  # one between two steps: length requests take turns with decoding
                    self._call(*self._calls.popleft())
                if self.scheduler.busy:
                    self._step()
            except Exception as err:  # a failed step must not take the server down
                log.exception("decoding step failed; answering the requests in the batch with an error")
                # The failed batch is dropped whole (its state may be broken: no abort on it).
                self.scheduler = Scheduler(self.engine, self.batch_size)
                self._fail(
                    EngineFailure(f"the decoding engine failed: {type(err).__name__}: {err}"), abort=False
                )
            self._gauges()

    def _commands(self, block: bool) -> list[tuple]:
        commands = []
        if block:
            try:
                commands.append(self._inbox.get(timeout=IDLE_POLL_S))
            except queue.Empty:
                return commands
        while True:
            try:
                commands.append(self._inbox.get_nowait())
            except queue.Empty:
                return commands

    def _apply(self, command: tuple) -> None:
        kind = command[0]
        if kind == "add":
            self._add(command[1])
        elif kind == "abort":
            for key in command[1].keys:
                entry = self._live.pop(key, None)
                if entry is not None:
                    self.scheduler.abort(key)
                    self._release(entry[1].choice.rows)
        elif kind == "call":
            self._calls.append(command[1:])
        elif kind == "fail":
            self._fail(command[1])
            self._fail_calls(command[1])

    def _call(self, fn: Callable[[], Any], future: asyncio.Future, loop: asyncio.AbstractEventLoop) -> None:
        try:
            outcome, value = "result", fn()
        except Exception as err:
            outcome, value = "exception", err
        loop.call_soon_threadsafe(_settle, future, outcome, value)

    def _add(self, submission: Submission) -> None:
        added = []
        try:
            for key, choice in zip(submission.keys, submission.choices, strict=True):
                self.scheduler.add(choice.request, key)
                added.append(key)
        except Exception as err:  # InputError for a request the engine cannot take
            for done in added:
                self.scheduler.abort(done)
            self._release(sum(c.rows for c in submission.choices))
            if isinstance(err, RequestError):  # named by a key the client never saw: the reason alone
                err = InputError(err.reason)
            submission.put(err)
            return
        for index, (key, choice) in enumerate(zip(submission.keys, submission.choices, strict=True)):
            self._live[key] = (submission, _Tracker(index, choice, self.engine.tokenizer))
        submission.put(_ACCEPTED)

    def _step(self) -> None:
        start = time.perf_counter()
        updates = self.scheduler.step()
        if self.metrics is not None:
            self.metrics.step_seconds.observe(time.perf_counter() - start)
        for update in updates:
            entry = self._live.get(update.key)
            if entry is None:
                continue
            submission, tracker = entry
            chunk = tracker.update(update)
            if chunk is None:
                continue
            submission.put(chunk)
            if chunk.finish is not None:
                del self._live[update.key]
                self._release(tracker.choice.rows)
                if update.result is None:  # a stop string ended it before the engine did
                    self.scheduler.abort(update.key)
                if self.metrics is not None:
                    self.metrics.generated_tokens.inc(chunk.finish.completion_tokens)
                    self.metrics.discarded_tokens.inc(chunk.finish.discarded_tokens)

    def _fail_calls(self, error: BaseException) -> None:
        """Answer the calls not run yet with ``error``."""
        while self._calls:
            _, future, loop = self._calls.popleft()
            loop.call_soon_threadsafe(_settle, future, "exception", error)

    def _fail(self, error: BaseException, abort: bool = True) -> None:
        submissions = {id(s): s for s, _ in self._live.values()}
        for key in list(self._live) if abort else ():
            self.scheduler.abort(key)
        self._release(sum(tracker.choice.rows for _, tracker in self._live.values()))
        self._live.clear()
        for submission in submissions.values():
            submission.put(error)

    def _release(self, count: int) -> None:
        with self._lock:
            self._outstanding -= count

    def _gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(len(self.scheduler.waiting))
            self.metrics.running.set(self.scheduler.running)


def _settle(future: asyncio.Future, outcome: str, value: Any) -> None:
    if future.done():  # the caller gave up waiting
        return
    if outcome == "result":
        future.set_result(value)
    else:
        future.set_exception(value)


class _Tracker:
    """One choice's answer so far, as text: see the module doc. Each update costs what its new
    tokens do, however long the answer: the text is kept as its pieces and where each ends, and
    only new text (with what a stop string may reach back into) is searched; the last update
    reads the whole answer once."""

    def __init__(self, index: int, choice: Choice, tokenizer):
        self.index = index
        self.choice = choice
        # The server plans every request from token ids (lenvm.serve.protocol), never text.
        self.decoder = AnswerDecoder(tokenizer, cast(list[int], choice.request.prompt))
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.top: list[list[tuple[int, float]]] = []
        self.values: list[float] = []
        self.ends = [0]  # ends[k]: the length of the text of the first k tokens (their pieces)
        self.sent_tokens = 0
        self.sent_chars = 0
        # Characters that could be the start of a stop string stay back until they cannot.
        self.hold_back = max((len(s) for s in choice.stops), default=1) - 1

    def update(self, update: Update) -> Chunk | None:
        if self.choice.held:
            return None if update.result is None else self._whole(update.result)
        start = update.start
        self.tokens[start:] = update.tokens
        self.logprobs[start:] = update.logprobs
        self.top[start:] = update.top_logprobs
        self.values[start:] = update.values
        self.decoder.set(start, update.tokens)
        if update.result is None:
            # Until the answer ends, a character whose bytes are not all out yet is in no piece:
            # it is neither sent nor matched against the stop strings until it is complete.
            pieces = self.decoder.pieces
            del self.ends[start + 1 :]
            for piece in pieces[start:]:
                self.ends.append(self.ends[-1] + len(piece))
            stop = self._stop_from(start)
        else:
            pieces = self.decoder.finished()
            stop = first_stop("".join(pieces), self.choice.stops)
        if stop is not None:
            n = len(self.tokens)
            return self._final(
                _cut(pieces, self._cut_at(*stop)), Finish("stop", stop[1], n, 0, n, 0, None, False)
            )
        if update.result is not None:
            return self._final(pieces, Finish.of(update.result))
        return self._progress(pieces, self.ends[-1] - self.hold_back)

    def _stop_from(self, start: int) -> tuple[int, str] | None:
        """The first stop string in the text, now that tokens stand anew from ``start``: the text
        before them held none (an earlier update would have ended the answer), so only one that
        ends past it can start, at most ``hold_back`` characters before it."""
        if not self.choice.stops:
            return None
        since = max(self.ends[start] - self.hold_back, 0)
        stop = first_stop(self._text(since, self.ends[-1]), self.choice.stops)
        return None if stop is None else (since + stop[0], stop[1])

    def _text(self, begin: int, end: int) -> str:
        """Characters ``begin`` to ``end`` of the text (the decoder's pieces), joined from the
        pieces that hold them alone."""
        first = bisect.bisect_right(self.ends, begin) - 1  # the piece that holds character begin
        last = bisect.bisect_left(self.ends, end)  # ... through the one whose text reaches end
        offset = self.ends[first]
        return "".join(self.decoder.pieces[first:last])[begin - offset : end - offset]

    def _whole(self, result: Result) -> Chunk:
        """A held choice's final answer, cut at its first stop string."""
        self.tokens, self.logprobs, self.values = result.token_ids, result.logprobs, result.values or []
        self.top = result.top_logprobs or []
        self.decoder.set(0, self.tokens)
        pieces = self.decoder.finished()
        finish = Finish.of(result)
        stop = first_stop("".join(pieces), self.choice.stops)
        if stop is not None:
            at, string = stop
            # the fewest tokens whose text holds the stop string
            ends = itertools.accumulate(len(piece) for piece in pieces)
            kept = next(k for k, end in enumerate(ends, 1) if end >= at + len(string))
            del self.tokens[kept:], self.logprobs[kept:], self.values[kept:], self.top[kept:]
            pieces = _cut(pieces[:kept], self._cut_at(at, string))
            finish = Finish(
                "stop", string, kept, result.decoded_tokens - kept, kept, result.retries, None, False
            )
        return self._final(pieces, finish)

    def _cut_at(self, at: int, string: str) -> int:
        """Where the answer's text ends, given the stop string found at ``at``."""
        return at + len(string) if self.choice.include_stop else at

    def _final(self, pieces: list[str], finish: Finish) -> Chunk:
        """The last chunk: every token and all the text not sent yet."""
        sent, self.sent_tokens = self.sent_tokens, len(self.tokens)
        text = "".join(pieces)
        return self._chunk(pieces, text[self.sent_chars :], len(text), sent, finish)

    def _progress(self, pieces: list[str], released: int) -> Chunk | None:
        """The tokens not sent yet up to the last whose piece adds text and ends by ``released``,
        with their text; None if there are none. A stream sends each token with its text: text
        goes out only up to the end of a token sent, and a token that adds nothing yet (a piece of
        a character not yet complete) waits for the one that writes its text."""
        sent = self.sent_tokens
        within = max(bisect.bisect_right(self.ends, released) - 1, 0)  # tokens whose text ends by then
        upto = bisect.bisect_left(self.ends, self.ends[within])  # ... less those that add nothing
        if upto <= sent:
            return None
        self.sent_tokens = upto
        chars = self.ends[upto]
        return self._chunk(pieces, self._text(self.sent_chars, chars), chars, sent, None)

    def _chunk(self, pieces: list[str], text: str, chars: int, sent: int, finish: Finish | None) -> Chunk:
        """The tokens from ``sent`` up to those now sent, and ``text``: what their text, which
        comes to ``chars`` characters, adds past what was sent."""
        request = self.choice.request
        upto = self.sent_tokens
        chunk = Chunk(
            self.index,
            self.tokens[sent:upto],
            text,
            pieces[sent:upto],
            self.logprobs[sent:upto],
            self.top[sent:upto] if request.sampling.top_logprobs else None,
            self.values[sent:upto] if request.return_values else None,
            finish,
        )
        self.sent_chars = max(self.sent_chars, chars)
        return chunk


def _cut(pieces: list[str], at: int) -> list[str]:
    """The pieces of a text cut at ``at``: a piece past the cut keeps what lies before it."""
    cut, start = [], 0
    for piece in pieces:
        cut.append(piece[: max(at - start, 0)])
        start += len(piece)
    return cut


def first_stop(text: str, stops: tuple[str, ...]) -> tuple[int, str] | None:
    """Where the first of ``stops`` starts in ``text``, and which one; None if none occurs."""
    found = [(at, s) for s in stops if (at := text.find(s)) >= 0]
    return min(found) if found else None
