"""The HTTP server: an OpenAI-compatible API over the decoding engine, plus the length endpoints.

    app = create_app(engine, ServerSettings(served_model_name="smollm2-135m-instruct"))
    serve(engine, settings, host="127.0.0.1", port=8000)      # uvicorn, until SIGTERM

Routes: ``POST /v1/completions`` and ``/v1/chat/completions`` (streaming or not),
``POST /v1/length/predict`` and ``/v1/length/values``, ``GET /v1/models[/{name}]``, ``/health`` and
``/metrics`` (Prometheus). Generation runs on the engine's thread (:mod:`lenvm.serve.runner`) and
tokenizing on worker threads; handlers only parse, wait and write. Every failure is answered
with an OpenAI-style error body and its status (:class:`~lenvm.serve.protocol.ApiError`), never
by a dead engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import copy
import errno
import hmac
import ipaddress
import json
import logging
import math
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sized
from dataclasses import dataclass, field, replace
from functools import partial
from types import FrameType
from typing import Any, cast

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lenvm.decoding.engine import Engine
from lenvm.event_loops import run_own_loop
from lenvm.io import InputError, positive_count
from lenvm.model import LengthValueModel
from lenvm.prompts import template_kwargs_problem
from lenvm.quoting import plain_field, quoted, shortened
from lenvm.serve.metrics import Metrics
from lenvm.serve.protocol import (
    MAX_PROMPTS,
    ApiError,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    Context,
    Plan,
    PredictRequest,
    ValuesRequest,
    Writer,
    chat_prompt_ids,
    parse,
    plan_chat,
    plan_completion,
    prompt_list,
    refuse_template_arguments,
    template_arguments,
    text_prompt_ids,
    tokenize,
)
from lenvm.serve.runner import Chunk, EngineFailure, EngineRunner, QueueFull, ShuttingDown, Submission

log = logging.getLogger("lenvm.serve")

# Tokens (padding included) in one forward of /v1/length/predict, which runs on the engine thread:
# a list of long prompts is cut into such forwards so that decoding steps go on in between.
PREDICT_CHUNK_TOKENS = 4096


@dataclass
class ServerSettings:
    """How the server is named, guarded and bounded.

    ``batch_size`` rows decode at once and ``max_waiting`` more choices may wait for one (a request
    beyond that is answered 429; a length request takes one place while it runs); at most
    ``max_streams`` streaming responses are open at once (429), and one whose client reads
    nothing for ``stream_stall_timeout`` seconds while an event waits to be sent is ended as if
    the client had gone away (``inf``: never); a body over ``max_body_bytes`` is answered 413. On
    SIGTERM the server takes no new requests (503) and lets the ones in flight finish for up to
    ``shutdown_timeout`` seconds (``inf``: for as long as they take); then it answers what is left
    with an error.

    ``default_chat_template_kwargs`` (vLLM's ``--default-chat-template-kwargs``) are the chat
    template's arguments wherever the server applies it (chat completions, the length endpoints'
    ``messages``), under each request's own: ``{"enable_thinking": false}`` turns Qwen3's thinking
    off for every client that does not turn it on.

    ``api_key``: every ``/v1`` route asks for ``Authorization: Bearer KEY``; printable ASCII
    without spaces, which is what an HTTP header carries.

    ``loopback_names_only``: every ``/v1`` route answers only a request whose ``Host`` names this
    machine's loopback (``localhost``, ``127.0.0.1``, ``[::1]``, any port). A web page may point a
    name of its own at 127.0.0.1 (DNS rebinding) and then read what a keyless local server
    answers, as if it were its own site; the browser still sends that name as ``Host``.
    :func:`serve` sets it where it listens on loopback without an API key."""

    served_model_name: str
    api_key: str | None = None
    batch_size: int = 16
    max_waiting: int = 256
    max_streams: int = 64
    max_body_bytes: int = 1 << 20
    shutdown_timeout: float = 30.0
    stream_stall_timeout: float = 60.0
    default_chat_template_kwargs: dict[str, Any] | None = field(default_factory=dict)
    loopback_names_only: bool = False

    def __post_init__(self) -> None:
        if self.default_chat_template_kwargs is None:  # vLLM's default: none
            self.default_chat_template_kwargs = {}
        for name in ("batch_size", "max_streams", "max_body_bytes"):
            setattr(self, name, positive_count(getattr(self, name), name))
        if self.max_waiting < 0 or not self.shutdown_timeout >= 0:  # NaN fails too
            raise InputError("max_waiting and shutdown_timeout must not be negative (nor NaN)")
        if not self.stream_stall_timeout > 0:
            raise InputError("stream_stall_timeout must be a positive number of seconds (inf: no limit)")
        if (why := template_kwargs_problem(self.default_chat_template_kwargs)) is not None:
            raise InputError(f"default_chat_template_kwargs: {why}")
        if self.api_key is not None and (why := key_problem(self.api_key)) is not None:
            raise InputError(f"api_key {why}")


def key_problem(key: str) -> str | None:
    """Why no client could send ``key`` as ``Authorization: Bearer KEY``, or None: HTTP headers
    carry ASCII (a client cannot encode other characters, the server reads the bytes as Latin-1),
    and the server reads the key from after the space to the end, without surrounding
    whitespace."""
    if not isinstance(key, str) or not key:
        return "must be a non-empty string (None: no key)"
    bad = next((i for i, c in enumerate(key) if not "!" <= c <= "~"), None)
    if bad is not None:
        return (
            f"must be printable ASCII without spaces, which an HTTP header carries: its character {bad + 1} "
            f"(U+{ord(key[bad]):04X}) is not"
        )
    return None


class _State:
    """What the handlers share besides the runner: open streams and the shutdown."""

    def __init__(self, settings: ServerSettings, runner: EngineRunner):
        self.settings = settings
        self.runner = runner
        self.streams = 0
        self.draining = False
        self.started = int(time.time())

    def open_stream(self, metrics: Metrics) -> None:
        self.streams += 1
        metrics.open_streams.inc()

    def close_stream(self, metrics: Metrics) -> None:
        self.streams -= 1
        metrics.open_streams.dec()

    def interrupt(self) -> None:
        """From a second Ctrl-C: end every request in flight now, each answered with an error. From
        another thread: a signal handler may interrupt this one while it holds the runner's lock."""
        self.begin_shutdown()
        threading.Thread(target=self._abort_on_interrupt, daemon=True).start()

    def _abort_on_interrupt(self) -> None:
        log.warning("interrupted: answering the requests in flight with an error (Ctrl-C again: force quit)")
        self.runner.abort_all(ShuttingDown("the server was interrupted before this request finished"))

    def begin_shutdown(self) -> None:
        """From the SIGTERM handler: refuse new work; cut what is left after the timeout."""
        if self.draining:
            return
        self.draining = True
        self.runner.accepting = False
        # inf, or longer than a Timer can wait: no limit
        if self.settings.shutdown_timeout > threading.TIMEOUT_MAX:
            return
        timer = threading.Timer(
            self.settings.shutdown_timeout,
            self.runner.abort_all,
            [ShuttingDown("the server shut down before this request finished")],
        )
        timer.daemon = True
        timer.start()


def create_app(engine: Engine, settings: ServerSettings) -> FastAPI:
    """The ASGI app serving ``engine``; its engine thread runs while the app's lifespan does."""
    if settings.default_chat_template_kwargs and not getattr(engine.tokenizer, "chat_template", None):
        # Else every request with messages would be refused for arguments it did not send.
        raise InputError(
            "default_chat_template_kwargs are given, but the generator's tokenizer has no chat template "
            "to pass them to"
        )
    metrics = Metrics()
    runner = EngineRunner(engine, settings.batch_size, settings.max_waiting, metrics)
    state = _State(settings, runner)
    lenvm = engine.lenvm
    ctx = Context(
        tokenizer=engine.tokenizer,
        vocab_size=engine.vocab_size,
        context=engine.context,
        context_note=engine.context_note,
        has_lenvm=lenvm is not None,
        max_choices=runner.capacity,
        # Left out of a request, the sampling settings are the policy the LenVM was trained on
        # (its values describe that policy only), as on the command line.
        defaults=(lenvm.config.sampling or {}) if lenvm is not None else {},
        template_defaults=settings.default_chat_template_kwargs or {},
    )
    name = settings.served_model_name

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runner.start()
        yield
        await asyncio.to_thread(runner.stop)

    app = FastAPI(title="lenvm", lifespan=lifespan, openapi_url=None, docs_url=None, redoc_url=None)
    app.add_middleware(_RequestLog)
    app.state.lenvm = state
    app.state.metrics = metrics

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(ApiError(err.status_code, str(err.detail)).body(), status_code=err.status_code)

    @app.api_route("/health", methods=["GET", "HEAD"])  # load balancers probe with HEAD
    async def health() -> JSONResponse:
        ok = runner.alive and not state.draining
        body = {"status": "ok" if ok else ("shutting down" if state.draining else "engine stopped")}
        return JSONResponse({**body, "running": runner.scheduler.running}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    def model_card() -> dict[str, Any]:
        card: dict[str, Any] = {
            "id": name,
            "object": "model",
            "created": state.started,
            "owned_by": "lenvm",
            "root": name,
            "parent": None,
            "max_model_len": engine.context,
        }
        if lenvm is not None:
            card["lenvm"] = {
                "kind": lenvm.config.kind,
                "gamma": lenvm.gamma,
                "feature_layer": lenvm.feature_layer,
                "sampling": lenvm.config.sampling,
            }
        return card

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        _authorize(request, settings)
        return JSONResponse({"object": "list", "data": [model_card()]})

    @app.get("/v1/models/{model:path}")  # a served name may hold slashes (org/model)
    async def model(request: Request, model: str) -> JSONResponse:
        _authorize(request, settings)
        _check_model(model, name)
        return JSONResponse(model_card())

    async def generate(request: Request, endpoint: str, schema, planner: Callable[..., Plan]) -> Response:
        arrived = time.perf_counter()
        try:
            _authorize(request, settings)
            body = parse(schema, await _read_body(request, settings.max_body_bytes))
            _check_model(body.model, name)
            if state.draining:
                raise ShuttingDown("the server is shutting down")
            plan = await asyncio.to_thread(planner, body, ctx)  # tokenizing: off the event loop
            if plan.stream:  # reserved as it is checked: streams arriving together cannot all pass
                if state.streams >= settings.max_streams:
                    raise ApiError(429, f"too many open streams ({settings.max_streams}); try again later")
                state.open_stream(metrics)
            try:
                submission = runner.submit(plan.choices)
                try:
                    await submission.accepted()
                except BaseException:
                    runner.cancel(submission)
                    raise
            except BaseException:
                if plan.stream:
                    state.close_stream(metrics)
                raise
        except _ClientGone:
            metrics.requests.labels(endpoint, "cancelled").inc()
            return Response(status_code=499)
        except Exception as err:
            error = _as_api_error(err)
            metrics.requests.labels(endpoint, _outcome(error.status)).inc()
            return JSONResponse(error.body(), status_code=error.status)
        metrics.prompt_tokens.inc(plan.prompt_tokens)
        writer = Writer(plan, name, engine.tokenizer)
        call = _Call(endpoint, submission, arrived, metrics, runner, _note(request))
        call.note["prompt_tokens"] = plan.prompt_tokens
        if plan.stream:

            def closed(why: str) -> None:
                state.close_stream(metrics)
                call.close(why)

            return _EventStream(_events(call, writer, plan), closed, settings.stream_stall_timeout)
        return await _whole(call, writer, request)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await generate(request, "completions", CompletionRequest, plan_completion)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await generate(request, "chat", ChatCompletionRequest, plan_chat)

    async def length_endpoint(
        request: Request,
        endpoint: str,
        work: Callable[[bytes, LengthValueModel], Awaitable[dict[str, Any]]],
    ) -> Response:
        admitted = False
        try:
            _authorize(request, settings)
            body = await _read_body(request, settings.max_body_bytes)
            if lenvm is None:
                raise ApiError(400, "this server has no LenVM: start it with --lenvm")
            if state.draining:  # taken before the shutdown, a request goes on until its timeout
                raise ShuttingDown("the server is shutting down")
            with runner.place():  # or 429, as a generation that does not fit
                admitted = True
                answer = await work(body, lenvm)
        except _ClientGone:
            metrics.requests.labels(endpoint, "cancelled").inc()
            return Response(status_code=499)
        except Exception as err:
            error = _as_api_error(err)
            cut = admitted and isinstance(err, ShuttingDown)
            metrics.requests.labels(endpoint, "aborted" if cut else _outcome(error.status)).inc()
            return JSONResponse(error.body(), status_code=error.status)
        metrics.requests.labels(endpoint, "ok").inc()
        return JSONResponse(answer)

    @app.post("/v1/length/predict")
    async def predict(request: Request) -> Response:
        async def work(raw: bytes, lenvm: LengthValueModel) -> dict[str, Any]:
            body = parse(PredictRequest, raw)
            _check_model(body.model, name)
            prompts = await asyncio.to_thread(_predict_prompts, body, ctx)  # off the event loop
            _note(request)["prompt_tokens"] = sum(map(len, prompts))
            values = [0.0] * len(prompts)

            async def predict_all() -> None:
                # A forward of a bounded size at a time, so that decoding steps run in between.
                for chunk in _forward_chunks([len(p) for p in prompts], PREDICT_CHUNK_TOKENS):
                    got = await runner.call(partial(lenvm.predict_values, [prompts[i] for i in chunk]))
                    for i, value in zip(chunk, got, strict=True):
                        values[i] = value

            await _unless_gone(request, predict_all())
            lengths = lenvm.lengths_from_values(values)  # as the library predicts: at least 1
            data = [
                {"index": i, "prompt_tokens": len(ids), "value": value, "predicted_tokens": length}
                for i, (ids, value, length) in enumerate(zip(prompts, values, lengths, strict=True))
            ]
            return {"object": "list", "model": name, "gamma": lenvm.gamma, "data": data}

        return await length_endpoint(request, "length_predict", work)

    @app.post("/v1/length/values")
    async def values(request: Request) -> Response:
        from lenvm.values_view import token_values

        async def work(raw: bytes, lenvm: LengthValueModel) -> dict[str, Any]:
            body = parse(ValuesRequest, raw)
            _check_model(body.model, name)
            prompt, completion = await asyncio.to_thread(_values_ids, body, ctx)  # off the event loop
            trace = await runner.call(lambda: token_values(lenvm, prompt, completion, finished=body.finished))
            return {"object": "length.values", "model": name, **trace.to_dict()}

        return await length_endpoint(request, "length_values", work)

    return app


# -- generation ------------------------------------------------------------------------------


# Why a request's answer was not complete, in its log line.
GONE = "the client went away before the answer was complete"
STOPPED = "the server exited before the answer was complete"


class _Call:
    """One generation request in flight: its timing and its one outcome."""

    def __init__(
        self,
        endpoint: str,
        submission: Submission,
        arrived: float,
        metrics: Metrics,
        runner: EngineRunner,
        note: dict[str, Any],
    ):
        self.endpoint = endpoint
        self.submission = submission
        self.arrived = arrived
        self.metrics = metrics
        self.runner = runner
        self.note = note  # what the request's log line says of it
        self.first_token = False
        self.outcome: str | None = None

    def token(self, chunk: Chunk) -> None:
        if not self.first_token:
            self.first_token = True
            self.metrics.first_token_seconds.observe(time.perf_counter() - self.arrived)
        self.note["completion_tokens"] = self.note.get("completion_tokens", 0) + len(chunk.token_ids)

    def finish(self, outcome: str) -> None:
        if self.outcome is None:
            self.outcome = outcome
            self.metrics.requests.labels(self.endpoint, outcome).inc()
            if outcome == "ok":
                self.metrics.request_seconds.observe(time.perf_counter() - self.arrived)

    def close(self, why: str = GONE) -> None:
        """The response is over: whatever did not finish was cancelled, by the client (``GONE``)
        or by the server's forced exit (``STOPPED``)."""
        self.runner.cancel(self.submission)  # frees the rows of unfinished choices, if any
        if self.outcome is None:  # a stream's status, sent already, says nothing of it
            self.note.setdefault("error", why)
        self.finish("cancelled")


async def _whole(call: _Call, writer: Writer, request: Request) -> Response:
    async def collect() -> list:
        chunks = []
        async for chunk in call.submission.chunks():
            call.token(chunk)
            chunks.append(chunk)
        return chunks

    try:
        chunks = await _unless_gone(request, collect())
        # Off the event loop: with logprobs a whole answer may take seconds to write (n x tokens x
        # alternatives), during which other streams and /health would wait. A failure writing it
        # is the request's too.
        response = await asyncio.to_thread(lambda: JSONResponse(writer.answer(chunks)))
    except _ClientGone:
        call.close()  # the client went away: free its rows now
        return Response(status_code=499)
    except asyncio.CancelledError:  # the handler itself was cancelled (a forced exit): likewise
        call.close(STOPPED)
        raise
    except Exception as err:
        error = _as_api_error(err)
        call.finish("aborted" if isinstance(err, ShuttingDown) else _outcome(error.status))
        return JSONResponse(error.body(), status_code=error.status)
    call.finish("ok")
    return response


async def _events(call: _Call, writer: Writer, plan: Plan) -> AsyncIterator[str]:
    for opening in writer.opening():
        yield _sse(opening)
    try:
        async for chunk in call.submission.chunks():
            call.token(chunk)
            yield _sse(writer.chunk(chunk))
            # Neither queued chunks nor uvicorn's writes (short of a full buffer) suspend: without a
            # turn of the loop between events, a client's reset goes unseen and the events queued
            # after it are each written to the dead socket.
            await asyncio.sleep(0)
        if plan.include_usage:
            yield _sse(writer.usage_chunk())
        call.finish("ok")
    except Exception as err:  # shutdown or engine failure mid-stream: say so, then end the stream
        error = _as_api_error(err)
        call.finish("aborted" if isinstance(err, ShuttingDown) else "error")
        call.note["error"] = error.message  # the status, sent already, says nothing of it
        yield _sse(error.body())
    yield "data: [DONE]\n\n"


class _EventStream(StreamingResponse):
    """Server-sent events; ``closed`` runs however the response ends, a client that went away
    before the first byte included. A client that reads nothing while an event waits to be sent
    for ``stall_timeout`` seconds is taken for gone: else it would hold its rows, its stream's
    place and all the output the engine queues for it for as long as it keeps the connection."""

    def __init__(self, content: AsyncIterator[str], closed: Callable[[str], None], stall_timeout: float):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.closed = closed  # told why, where the stream did not end of itself
        self.stall_timeout = stall_timeout

    async def __call__(self, scope, receive, send) -> None:
        why = GONE
        limit = None if math.isinf(self.stall_timeout) else self.stall_timeout

        async def send_unless_stalled(message: Message) -> None:
            try:  # uvicorn's send waits only while the client's socket takes no more
                await asyncio.wait_for(send(message), limit)
            except asyncio.TimeoutError:
                raise _Stalled from None

        try:
            await super().__call__(scope, receive, send_unless_stalled)
        except _Stalled:
            why = f"the client stopped reading: an event waited {self.stall_timeout:g} s to be sent"
            _STALLED.set(True)  # the response ends unfinished: uvicorn closes the connection
        except asyncio.CancelledError:  # the server's forced exit (a client's leaving ends it quietly)
            why = STOPPED
            raise
        finally:
            self.closed(why)


class _Stalled(Exception):
    """A stream's client read nothing for its stall timeout while an event waited to be sent."""


# Set in the task of a request whose stream stalled: uvicorn's line on the unfinished response
# says nothing the request's own line does not (see _StalledStreamsNote).
_STALLED: contextvars.ContextVar[bool] = contextvars.ContextVar("lenvm_stalled", default=False)


class _RequestLog:
    """One INFO line per finished request: the client, method, path, status, seconds taken, the
    tokens of a generation and the message of an error."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        note: dict[str, Any] = {"status": 500}  # an exception that escaped the handlers
        scope[_NOTE] = note

        async def send_noted(message: Message) -> None:
            if message["type"] == "http.response.start":
                note["status"] = message["status"]
            elif message["type"] == "http.response.body" and note["status"] >= 400 and "error" not in note:
                note["error"] = _error_message(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, send_noted)
        finally:
            client = scope.get("client")
            tokens = "".join(f" {k}={note[k]}" for k in ("prompt_tokens", "completion_tokens") if k in note)
            log.info(
                '%s "%s %s" %d %.3fs%s%s',
                f"{client[0]}:{client[1]}" if client else "-",
                scope["method"],
                # A client's, of any length (a model's name in /v1/models/), decoded: a line break or
                # a terminal's escape in it would forge a line or redraw the screen.
                plain_field(shortened(scope["path"])),
                note["status"],
                time.perf_counter() - start,
                tokens,
                f": {note['error']}" if note.get("error") else "",
            )


_NOTE = "lenvm.log"  # the scope key of what a request's log line says of it


def _note(request: Request) -> dict[str, Any]:
    """What the request's log line says of it (see :class:`_RequestLog`); filled in by handlers."""
    return request.scope.setdefault(_NOTE, {})


def _error_message(body: bytes) -> str | None:
    with contextlib.suppress(ValueError, TypeError, KeyError):
        return str(json.loads(body)["error"]["message"])
    return None


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


class _ClientGone(Exception):
    """The client disconnected before its answer was ready."""


async def _unless_gone(request: Request, work: Awaitable[Any]) -> Any:
    """``work``'s result, or, if the client disconnects first, :class:`_ClientGone` with ``work``
    cancelled."""
    working = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({working, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not working.done():
            working.cancel()
            await asyncio.wait({working})  # a task is cancelled only once it has run again
    if working.cancelled():
        raise _ClientGone
    return working.result()


def _forward_chunks(lengths: list[int], budget: int) -> list[list[int]]:
    """Indices of sequences of ``lengths``, shortest first, in groups whose padded size (count
    times longest) stays within ``budget`` tokens (a longer sequence alone)."""
    chunks: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        if chunks and (len(chunks[-1]) + 1) * lengths[i] <= budget:
            chunks[-1].append(i)
        else:
            chunks.append([i])
    return chunks


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


# -- requests --------------------------------------------------------------------------------


def _authorize(request: Request, settings: ServerSettings) -> None:
    if settings.loopback_names_only and not _loopback(host_name(request.headers.get("host", "localhost"))):
        raise ApiError(
            403,
            f"this server answers requests for this machine's loopback names only (localhost, 127.0.0.1, "
            f"[::1]), not Host {quoted(request.headers.get('host', ''))}: it listens on loopback without an "
            "API key (set --api-key or LENVM_API_KEY to serve other names)",
        )
    if settings.api_key is None:
        return
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        token.strip().encode(), settings.api_key.encode()
    ):
        raise ApiError(401, "invalid or missing API key (Authorization: Bearer KEY)")


async def _read_body(request: Request, limit: int) -> bytes:
    _check_json(request.headers.get("content-type"))
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the body exceeds {limit} bytes")
    parts, size = [], 0
    try:
        async for part in request.stream():
            size += len(part)
            if size > limit:
                raise ApiError(413, f"the body exceeds {limit} bytes")
            parts.append(part)
    except ClientDisconnect:
        raise _ClientGone from None
    return b"".join(parts)


def _check_json(content_type: str | None) -> None:
    """A body is JSON: declared so, or not declared (as FastAPI takes it). A web page may send a
    text/plain or form POST to this machine without asking first (a CORS preflight), which this
    refuses, as FastAPI (vLLM's server) does."""
    if not content_type:
        return
    kind, _, subtype = content_type.partition(";")[0].strip().lower().partition("/")
    if kind != "application" or not (subtype == "json" or subtype.endswith("+json")):
        raise ApiError(
            415, f"the body must be JSON, sent as Content-Type: application/json (got {quoted(content_type)})"
        )


def _check_model(model: str | None, name: str) -> None:
    if model is not None and model != name:
        raise ApiError(404, f"the model {quoted(model)} does not exist; this server serves {name!r}", "model")


def _predict_prompts(body: PredictRequest, ctx: Context) -> list[list[int]]:
    if body.prompt is not None and body.messages is None:
        refuse_template_arguments(body)
        texts = prompt_list(body.prompt)
        _check_count(texts, "prompt")
        ids = [text_prompt_ids(p, ctx) for p in texts]
        given = "prompt"
    elif body.messages is not None and body.prompt is None:
        chats = _conversations(body.messages)
        _check_count(chats, "messages")
        kwargs = template_arguments(body)
        ids = [chat_prompt_ids(m, ctx, kwargs) for m in chats]
        given = "messages"
    else:
        raise ApiError(400, "give a prompt or messages (one or a list)")
    for p in ids:
        if len(p) > ctx.context:
            raise ApiError(
                400,
                f"a prompt has {len(p)} tokens; this model's context is "
                f"{ctx.context} tokens{ctx.context_note}",
                given,
            )
    return ids


def _conversations(messages: list[ChatMessage] | list[list[ChatMessage]]) -> list[list[ChatMessage]]:
    """One conversation or a list of them, as a list."""
    if messages and isinstance(messages[0], ChatMessage):
        return [cast(list[ChatMessage], messages)]  # validated as one of the types: all messages
    return cast(list[list[ChatMessage]], messages)


def _check_count(prompts: Sized, param: str) -> None:
    """Before any is tokenized; ``param``: the field that holds them."""
    if not prompts:
        raise ApiError(400, "no prompts given", param)
    if len(prompts) > MAX_PROMPTS:
        raise ApiError(400, f"at most {MAX_PROMPTS} prompts in one request", param)


def _values_ids(body: ValuesRequest, ctx: Context) -> tuple[list[int], list[int]]:
    """The prompt's and the completion's token ids of a values request."""
    if body.prompt is not None and body.messages is None:
        refuse_template_arguments(body)
        prompt = text_prompt_ids(body.prompt, ctx)
    elif body.messages is not None and body.prompt is None:
        prompt = chat_prompt_ids(body.messages, ctx, template_arguments(body))
    else:
        raise ApiError(400, "give a prompt or messages")
    completion = body.completion
    if isinstance(completion, str):  # tokenized on its own, as token_values does
        completion = tokenize(completion, ctx, add_special_tokens=False)
    # Empty is the library's to judge: a finished one is an answer that was only its EOS.
    return prompt, text_prompt_ids(completion, ctx, what="completion") if completion else []


def _as_api_error(err: BaseException) -> ApiError:
    if isinstance(err, ApiError):
        return err
    if isinstance(err, InputError):
        return ApiError(400, str(err))
    if isinstance(err, QueueFull):
        return ApiError(429, str(err))
    if isinstance(err, ShuttingDown):
        return ApiError(503, str(err))
    if isinstance(err, EngineFailure):  # the engine thread logged its traceback
        return ApiError(500, str(err))
    # A bug, not the client's doing: the request's log line has the message, this the traceback.
    log.error("internal error answering a request", exc_info=err)
    return ApiError(500, f"internal error: {type(err).__name__}: {err}")


def _outcome(status: int) -> str:
    if status == 401:
        return "unauthorized"
    if status in (429, 503):
        return "rejected"
    return "invalid" if status < 500 else "error"


# -- running ---------------------------------------------------------------------------------


def serve(
    engine: Engine,
    settings: ServerSettings,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
) -> None:
    """Serve until SIGTERM or Ctrl-C; requests in flight then finish (see :class:`ServerSettings`)."""
    check_address(host, port)
    if settings.api_key is None and _loopback(host):
        settings = replace(settings, loopback_names_only=True)
    app = create_app(engine, settings)
    state = app.state.lenvm
    server = _Server(server_config(app, host, port, log_level), state.begin_shutdown, state.interrupt)
    if settings.api_key is None and not _loopback(host):  # logged once the config set up the log
        log.warning(
            "listening on %s without an API key: any client that reaches this address can use the "
            "server (set --api-key or LENVM_API_KEY, or listen on 127.0.0.1)",
            host,
        )
    # Where this thread runs an event loop (a notebook's), the server runs in a worker thread,
    # which receives no signals: an interrupt here stops it as a signal there would.
    run_own_loop(server.run, lambda: server.handle_exit(signal.SIGINT, None))


def server_config(app: FastAPI, host: str, port: int, log_level: str) -> uvicorn.Config:
    """uvicorn's settings for ``app``: the server's own line per request replaces uvicorn's access
    log (which knows neither tokens nor errors), written as uvicorn writes its lines."""
    logging_config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    logging_config["loggers"][log.name] = {
        "handlers": ["default"],
        "level": log_level.upper(),
        "propagate": False,
    }
    logging_config.setdefault("filters", {})["lenvm_interrupts"] = {"()": _InterruptsNote}
    logging_config["filters"]["lenvm_stalls"] = {"()": _StalledStreamsNote}
    logging_config["loggers"]["uvicorn.error"]["filters"] = ["lenvm_interrupts", "lenvm_stalls"]
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        log_config=logging_config,
        access_log=False,
        timeout_graceful_shutdown=None,
    )


def host_name(host: str) -> str:
    """The name in an HTTP ``Host`` header, without its port and brackets, lowercase, without a
    final dot (``[::1]:8000`` -> ``::1``, ``LocalHost.:80`` -> ``localhost``)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    if host.count(":") == 1:
        host = host.partition(":")[0]
    return host.rstrip(".")


def _loopback(host: str) -> bool:
    """Whether ``host`` is this machine's loopback address, which no other machine reaches."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name: an interface that other machines may reach
        return False


def check_address(host: str, port: int) -> None:
    """Refuse, naming it, an address the server could not listen on (a port in use, a host that is
    not this machine's): uvicorn would log it and exit with its own status."""
    if port == 0:  # any free port
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, kind, proto, _, address = infos[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            probe.bind(address)
    except OSError as err:
        reason = (
            "is in use (another server?)"
            if err.errno == errno.EADDRINUSE
            else f"cannot be used ({err.strerror})"
        )
        raise InputError(f"{host}:{port} {reason}: choose another --port or --host") from None


class _InterruptsNote(logging.Filter):
    """uvicorn's lines while it waits for requests in flight say that Ctrl-C forces its exit; here
    the next Ctrl-C answers those requests with an error first (see :class:`_Server`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and record.msg.endswith(_UVICORN_FORCE_QUIT):
            record.msg = record.msg[: -len(_UVICORN_FORCE_QUIT)] + _INTERRUPTS
        return True


class _StalledStreamsNote(logging.Filter):
    """Drops uvicorn's error that an app returned without completing its response where that was
    a stream ended because its client read nothing (the request's own line says so): no bug."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (_STALLED.get() and record.msg == _UVICORN_INCOMPLETE)


_UVICORN_INCOMPLETE = "ASGI callable returned without completing response."
_UVICORN_FORCE_QUIT = "(CTRL+C to force quit)"
_INTERRUPTS = "(Ctrl-C: answer them with an error now; Ctrl-C twice: force quit)"


class _Server(uvicorn.Server):
    """uvicorn's server, which also tells the app when a signal asks it to stop. A second Ctrl-C
    ends the requests in flight, each answered with an error, where uvicorn would force its exit
    and drop them unanswered; a third forces it."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None], on_interrupt: Callable[[], None]):
        super().__init__(config)
        self.on_exit = on_exit
        self.on_interrupt = on_interrupt
        self.interrupted = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit and sig == signal.SIGINT and not self.interrupted:
            self.interrupted = True
            self.on_interrupt()
            return
        self.on_exit()
        super().handle_exit(sig, frame)
