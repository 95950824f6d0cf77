"""The OpenAI wire format: request bodies (checked here, with OpenAI-style errors), what they ask
of the engine, and the JSON of answers and stream chunks.

Shapes follow vLLM's OpenAI-compatible server, so that a client moves between the two by its base
URL alone: the same fields (``vllm_xargs``, ``top_k``, ``min_p``, ``ignore_eos``,
``return_tokens_as_token_ids``, ``add_special_tokens``), ``finish_reason`` ``"stop"`` or
``"length"`` with vLLM's ``stop_reason``, and ``usage`` with prompt, completion and total tokens.
What lenvm adds: the flat ``length_*`` keys (top-level or in ``vllm_xargs``), ``return_values``
(each choice's ``values``), each controlled choice's ``length`` summary, and
``usage.discarded_tokens`` (tokens decoded and thrown away by retries and ``best_of``).

Unlike vLLM, which ignores fields it does not know, an unknown or mistyped field is an error here,
and so is a known one this server cannot honour (``echo``, penalties, ``logit_bias``...).
"""

from __future__ import annotations

import codecs
import json
import re
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any, Literal, TypeVar, cast

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import ErrorDetails

from lenvm.decoding.params import (
    LENGTH_KEYS,
    MAX_TOP_LOGPROBS,
    TARGET_KINDS,
    Control,
    LengthKeyError,
    Request,
    SamplingParams,
    control_from_keys,
)
from lenvm.io import InputError, outside_vocabulary
from lenvm.prompts import Prompt, encode_prompt, template_kwargs_problem, unencodable
from lenvm.quoting import plain_field, quoted, quoted_json, shortened
from lenvm.rollouts import derive_seed
from lenvm.serve.runner import Choice, Chunk, Finish
from lenvm.values_view import token_bytes, token_texts_alone

# OpenAI's default max_tokens for text completions (vLLM's too); chat answers may fill the context.
COMPLETIONS_MAX_TOKENS = 16
MAX_PROMPTS = 1024  # prompts in one predict or completions request

ERROR_TYPES = {401: "authentication_error", 429: "rate_limit_error"}


class ApiError(Exception):
    """An error answer: ``{"error": {"message", "type", "param", "code"}}`` with its HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param

    @property
    def type(self) -> str:
        if self.status >= 500:
            return "server_error"
        return ERROR_TYPES.get(self.status, "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return {
            "error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status}
        }


# -- request bodies --------------------------------------------------------------------------


class _Body(BaseModel):
    # Strict: "5" is not a number and true is not 1; unknown fields are errors.
    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_left_out(cls, data: Any) -> Any:
        # As in OpenAI's API, null leaves a field at its default: OpenAI's own clients send
        # n=None, stream=None and the like for arguments passed as None.
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None or k not in cls.model_fields}
        return data


class StreamOptions(_Body):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: with include_usage, usage so far in every chunk


XargValue = str | int | float | bool | None


class _Generation(_Body):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)  # vLLM's range, SamplingParams' too
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    response_format: dict[str, Any] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    return_tokens_as_token_ids: bool = False
    vllm_xargs: dict[str, XargValue] | None = None
    return_values: bool = False
    # The flat length keys; control_from_keys checks their values.
    length_equal_to: Any = None
    length_at_most: Any = None
    length_at_least: Any = None
    length_tilt: Any = None
    length_rule: Any = None
    length_retries: Any = None
    length_best_of: Any = None
    length_hard_cap_slack: Any = None


class CompletionRequest(_Generation):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    add_special_tokens: bool = True


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None
    # Fields of OpenAI's assistant messages, so that a returned message can be sent back as it
    # is: a refusal, audio or annotations are left out of the prompt; a tool call cannot be.
    refusal: str | None = None
    audio: Any = None
    annotations: list[Any] | None = None
    tool_calls: list[Any] | None = None
    function_call: Any = None

    @model_validator(mode="before")
    @classmethod
    def _text_parts_only(cls, data: Any) -> Any:
        content = data.get("content") if isinstance(data, dict) else None
        if isinstance(content, list):
            if any(isinstance(p, dict) and "type" not in p for p in content):
                raise ValueError("a content part needs a 'type'")
            # A type may be any JSON value, an object (unhashable) included; a string's line breaks
            # would start lines of their own in the server's log.
            kinds = {
                plain_field(shortened(t)) if isinstance(t := p["type"], str) else quoted_json(t)
                for p in content
                if isinstance(p, dict) and p["type"] != "text"
            }
            if kinds:
                raise ValueError(
                    f"content parts of type {', '.join(sorted(kinds))} are not supported: "
                    "the server takes text; prompts with images go through lenvm generate or the "
                    "Python Engine"
                )
        return data

    @model_validator(mode="after")
    def _no_tool_calls(self) -> ChatMessage:
        if self.tool_calls or self.function_call:
            raise ValueError("tool calls are not supported")
        if self.content is None and self.role != "assistant":  # as in OpenAI's API
            raise ValueError(
                f"a {plain_field(shortened(self.role))} message needs its content (an empty string is fine)"
            )
        return self


# The efforts vLLM's chat completions take (OpenAI's, and DeepSeek's "max"): a client's typo is
# refused rather than reaching the template, which would read it as some effort.
ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"]


class _Templated(_Body):
    """The chat template's arguments of a request that takes messages (see
    :func:`template_arguments`)."""

    chat_template_kwargs: dict[str, Any] | None = None
    reasoning_effort: ReasoningEffort | None = None


class ChatCompletionRequest(_Generation, _Templated):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    # Informational in OpenAI's API: taken, changing nothing here.
    store: bool = False
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    # Taken where they ask for what this server does anyway (see _refuse_unsupported_chat).
    modalities: list[str] | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    # vLLM's: the generation prompt, or the last message left open for the answer to go on with.
    add_generation_prompt: bool = True
    continue_final_message: bool = False


class PredictRequest(_Templated):
    """``prompt``: text tokenized as is (what /v1/completions takes) or token ids, one or a list;
    ``messages``: chat messages (the chat template is applied, with the request's template
    arguments), one conversation or a list."""

    model: str | None = None
    prompt: str | list[str] | list[int] | list[list[int]] | None = None
    messages: list[ChatMessage] | list[list[ChatMessage]] | None = None


class ValuesRequest(_Templated):
    model: str | None = None
    prompt: str | list[int] | None = None
    messages: list[ChatMessage] | None = None
    completion: str | list[int]
    finished: bool = True


Body = TypeVar("Body", bound=BaseModel)


def parse(model: type[Body], body: bytes) -> Body:
    """Validate a JSON body; :class:`ApiError` 400 naming the first problem. A byte-order mark
    before the JSON is taken, as Python's JSON reader (vLLM's server) and lenvm's files take it."""
    body = body.removeprefix(codecs.BOM_UTF8)
    try:
        return model.model_validate_json(body)
    except ValidationError as err:
        raise ApiError(400, *_describe(err.errors(), body)) from None


def _describe(errors: list[ErrorDetails], body: bytes) -> tuple[str, str | None]:
    # A check of ours that failed says more than the union members it failed in.
    error = next((e for e in errors if e["type"] == "value_error"), errors[0])
    if error["type"] == "json_invalid":
        return _not_json(body, error["msg"].removeprefix("Invalid JSON: ")), None
    if error["type"] == "model_type" and not error["loc"]:
        return "the body must be a JSON object", None
    # Union members show up in the location as type names ("list[int]"): leave them out, and
    # name them all when none fitted. A location may hold a client's keys (an unknown field's,
    # vllm_xargs'), of any length.
    loc = error["loc"]
    members = _member_positions(loc, _json_or_none(body))
    path = [str(p) for k, p in enumerate(loc) if k not in members]
    name = shortened(".".join(path))
    param = shortened(path[0]) if path else None
    if error["type"] == "extra_forbidden":
        return f"unknown field {quoted(name)}", param
    if error["type"] == "missing":
        return f"missing field {quoted(name)}", param
    if error["type"] != "value_error" and members:
        union = min(members)  # where the value fitted none of them
        shown = dict.fromkeys(
            _type_shown(e["loc"][union])
            for e in errors
            if e["loc"][:union] == loc[:union] and len(e["loc"]) > union
        )
        return f"{shortened('.'.join(map(str, loc[:union])))}: expected one of {', '.join(shown)}", param
    return f"{name}: {error['msg'].removeprefix('Value error, ')}", param


def _member_positions(loc: tuple[int | str, ...], data: Any) -> set[int]:
    """The places of ``loc`` that name a union's member, followed along the body ``data``: a
    client's key may read as a type name too (``"str"``, ``"a[b]"``), and is the body's."""
    members = set()
    for k, part in enumerate(loc):
        try:
            data = data[part]  # a key or an index of the body
        except (KeyError, IndexError, TypeError):
            if _is_type_name(part):
                members.add(k)
            else:  # a field the body lacks: nothing to follow
                data = None
    return members


def _json_or_none(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError):  # not JSON to Python (it was to pydantic): no keys known
        return None


def _not_json(body: bytes, reason: str) -> str:
    """Why ``body`` is not the JSON a request is, where the parser said ``reason``: in lenvm's
    words where the parser's name no cause a client knows (bytes that are not UTF-8, a lone
    surrogate, which the parser calls the end of an escape)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as err:
        return f"the body is not UTF-8 text (byte {err.start + 1})"
    try:  # Python's reader takes a lone surrogate, which unencodable then names
        why = unencodable(json.loads(text))
    except (ValueError, RecursionError):  # not JSON to Python either
        why = None
    return f"the body: {why}" if why is not None else f"malformed JSON: {reason}"


def _type_shown(name: Any) -> str:
    """A union member's type as a client reads it: without our validators' wrappers."""
    return re.sub(r"function-(?:after|before|wrap|plain)\[[^,\[\]]*, ([^\[\]]+)\]", r"\1", str(name))


def _is_type_name(part: Any) -> bool:
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool", "none"))


# -- what a generation request asks of the engine -------------------------------------------


@dataclass
class Context:
    """What the server knows when it turns a request into engine work."""

    tokenizer: Any
    vocab_size: int  # the token ids a prompt may hold: the engine's (Engine.vocab_size)
    context: int  # the model's context, in tokens
    has_lenvm: bool
    max_choices: int  # choices the server holds at once (running and waiting)
    defaults: dict[str, Any] = field(default_factory=dict)  # sampling when a request leaves it out
    # The chat template's arguments when a request leaves them out (ServerSettings').
    template_defaults: dict[str, Any] = field(default_factory=dict)
    context_note: str = ""  # said after the context where it is a sliding window (Engine.context_note)
    # Requests are planned on worker threads: one encodes at a time, as a fast tokenizer shared
    # between threads may fail ("Already borrowed") when two calls change its settings at once.
    tokenizer_lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class Plan:
    """A generation request as engine choices, and how its answer is written back."""

    endpoint: Literal["completions", "chat"]
    choices: list[Choice]
    prompt_tokens: int
    stream: bool
    include_usage: bool
    logprobs: int | None  # None: no log-probabilities; else how many alternatives per token
    token_ids_as_text: bool
    controlled: bool
    continuous_usage: bool = False  # the usage so far in every chunk too


def plan_completion(body: CompletionRequest, ctx: Context) -> Plan:
    if body.echo:
        raise ApiError(400, "echo is not supported", "echo")
    if body.suffix:
        raise ApiError(400, "suffix is not supported", "suffix")
    if body.best_of not in (None, 1):
        raise ApiError(400, "best_of is not supported; for Equal To, use length_best_of", "best_of")
    sent = _completion_prompts(body)
    _check_rows(body, len(sent), _length_control(body)[1], ctx)  # before tokenizing up to MAX_PROMPTS of them
    prompts = [text_prompt_ids(p, ctx, body.add_special_tokens) for p in sent]
    if body.logprobs is not None and not 0 <= body.logprobs <= MAX_TOP_LOGPROBS:
        raise ApiError(400, f"logprobs must lie in [0, {MAX_TOP_LOGPROBS}]", "logprobs")
    return _plan("completions", body, prompts, ctx, body.max_tokens, body.logprobs)


def plan_chat(body: ChatCompletionRequest, ctx: Context) -> Plan:
    _refuse_unsupported_chat(body)
    if body.continue_final_message and body.add_generation_prompt:
        raise ApiError(
            400,
            "continue_final_message goes on with the last message, add_generation_prompt starts a new one: "
            "set add_generation_prompt to false with it",
            "continue_final_message",
        )
    prompt = chat_prompt_ids(
        body.messages,
        ctx,
        template_arguments(body),
        add_generation_prompt=body.add_generation_prompt,
        continue_final_message=body.continue_final_message,
    )
    if body.top_logprobs and not body.logprobs:  # 0 without logprobs asks for nothing: fine
        raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    top = body.top_logprobs or 0
    if not 0 <= top <= MAX_TOP_LOGPROBS:
        raise ApiError(400, f"top_logprobs must lie in [0, {MAX_TOP_LOGPROBS}]", "top_logprobs")
    if body.max_tokens is not None and body.max_completion_tokens is not None:
        raise ApiError(400, "give max_tokens or max_completion_tokens, not both", "max_tokens")
    max_tokens = body.max_completion_tokens if body.max_tokens is None else body.max_tokens
    return _plan("chat", body, [prompt], ctx, max_tokens, top if body.logprobs else None)


def _plan(
    endpoint: Literal["completions", "chat"],
    body: _Generation,
    prompts: list[list[int]],
    ctx: Context,
    max_tokens: int | None,
    logprobs: int | None,
) -> Plan:
    _refuse_unsupported(body)
    if body.n < 1:
        raise ApiError(400, "n must be at least 1", "n")
    if max_tokens is not None and max_tokens < 1:
        raise ApiError(400, "max_tokens must be at least 1", "max_tokens")
    for ids in prompts:
        if len(ids) >= ctx.context:
            raise ApiError(
                400,
                f"the prompt has {len(ids)} tokens; this model's context is "
                f"{ctx.context} tokens{ctx.context_note}",
                "messages" if endpoint == "chat" else "prompt",
            )
    keys, control, return_values = _length_control(body)
    if (control is not None or return_values) and not ctx.has_lenvm:
        raise ApiError(400, "this server has no LenVM: start it with --lenvm for length controls and values")
    _check_rows(body, len(prompts), control, ctx)
    if control is not None and body.stream and control.kind in TARGET_KINDS and "length_retries" not in keys:
        # A stream cannot take tokens back: no retries unless asked for (then it is held back).
        control = replace(control, retries=0)
    stops = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    if any(not s for s in stops):
        raise ApiError(400, "stop strings must not be empty", "stop")
    if len(stops) > 16:
        raise ApiError(400, "at most 16 stop strings", "stop")
    top_k = body.top_k
    if top_k is not None and top_k < -1:
        raise ApiError(400, "top_k must be -1 or 0 (off) or a positive integer", "top_k")
    top_k = 0 if top_k == -1 else top_k  # vLLM's "off"
    given = {"temperature": body.temperature, "top_p": body.top_p, "top_k": top_k, "min_p": body.min_p}
    given = {k: v for k, v in given.items() if v is not None}  # the rest: the server's policy
    choices = []
    for ids in prompts:
        limit = max_tokens
        if limit is None:
            room = ctx.context - len(ids)  # at least 1: longer prompts were refused above
            plain = endpoint == "completions" and control is None
            limit = min(COMPLETIONS_MAX_TOKENS, room) if plain else room  # vLLM's default too
        if max_tokens is not None and len(ids) + max_tokens > ctx.context:
            raise ApiError(
                400,
                f"the prompt has {len(ids)} tokens: with max_tokens {max_tokens} it exceeds this model's "
                f"context of {ctx.context} tokens{ctx.context_note}",
                "max_tokens",
            )
        named = "max_tokens" if max_tokens is not None else "the context left after the prompt"
        if control is not None and (why := control.unreachable(limit, named)) is not None:
            raise ApiError(400, f"length_{why}", "max_tokens")  # named as the request's key
        for j in range(body.n):
            seed = body.seed if body.seed is None or j == 0 else derive_seed(body.seed, "choice", j)
            try:
                sampling = SamplingParams.from_policy(
                    ctx.defaults,
                    **given,
                    max_new_tokens=limit,
                    seed=seed,
                    ignore_eos=body.ignore_eos,
                    top_logprobs=logprobs or 0,
                )
            except InputError as err:
                raise ApiError(400, str(err)) from None
            request = Request(ids, sampling, control=control, return_values=return_values)
            choices.append(Choice(request, stops, body.include_stop_str_in_output))
    return Plan(
        endpoint=endpoint,
        choices=choices,
        prompt_tokens=sum(len(ids) for ids in prompts),
        stream=body.stream,
        include_usage=bool(body.stream_options and body.stream_options.include_usage),
        continuous_usage=bool(
            body.stream_options
            and body.stream_options.include_usage
            and body.stream_options.continuous_usage_stats
        ),
        logprobs=logprobs,
        token_ids_as_text=body.return_tokens_as_token_ids,
        controlled=control is not None,
    )


def _length_control(body: _Generation) -> tuple[dict[str, Any], Control | None, bool]:
    """The request's length keys, the control they make, and whether values are asked for."""
    keys, return_values = _length_keys(body)
    try:
        return keys, control_from_keys(keys), return_values
    except LengthKeyError as err:
        # Named as sent: a top-level key by its name, one in vllm_xargs by vllm_xargs.
        sent_top = err.key in LENGTH_KEYS and getattr(body, err.key) is not None
        raise ApiError(400, str(err), err.key if sent_top else "vllm_xargs") from None


def _check_rows(body: _Generation, prompts: int, control: Control | None, ctx: Context) -> None:
    best_of = control.best_of if control is not None else 1
    rows = body.n * prompts * best_of  # each best_of attempt holds a row of its own
    if rows > ctx.max_choices:
        raise ApiError(
            400,
            f"{rows} answers at once (n times the prompts times length_best_of) exceed what this server "
            f"holds at once ({ctx.max_choices})",
            "n" if best_of == 1 else "length_best_of",
        )


def _refuse_unsupported(body: _Generation) -> None:
    if body.presence_penalty != 0 or body.frequency_penalty != 0:
        raise ApiError(400, "presence and frequency penalties are not supported", "presence_penalty")
    if body.repetition_penalty != 1:
        raise ApiError(400, "repetition_penalty is not supported", "repetition_penalty")
    if body.logit_bias:
        raise ApiError(400, "logit_bias is not supported", "logit_bias")
    if body.stream_options is not None and not body.stream:
        raise ApiError(400, "stream_options needs stream: true", "stream_options")
    if not body.skip_special_tokens:
        raise ApiError(
            400,
            "skip_special_tokens: false is not supported (special tokens are left out of the text)",
            "skip_special_tokens",
        )
    kind = (body.response_format or {"type": "text"}).get("type")
    if kind != "text":
        raise ApiError(
            400,
            f"response_format of type {quoted(kind)} is not supported: the server writes free text",
            "response_format",
        )


def _refuse_unsupported_chat(body: ChatCompletionRequest) -> None:
    """Chat fields taken only with the values that ask for nothing this server does not do."""
    if body.modalities is not None and set(body.modalities) != {"text"}:
        raise ApiError(400, 'modalities other than ["text"] are not supported', "modalities")
    if body.tools:
        raise ApiError(400, "tools are not supported", "tools")
    if body.tool_choice not in (None, "none", "auto"):  # with no tools, "auto" calls none either
        raise ApiError(
            400, 'tool_choice other than "none" is not supported (there are no tools)', "tool_choice"
        )


def _length_keys(body: _Generation) -> tuple[dict[str, Any], bool]:
    """The flat length keys, top-level and in ``vllm_xargs`` (a key in both is an error), and
    whether values are asked for."""
    top = {k: getattr(body, k) for k in LENGTH_KEYS if getattr(body, k) is not None}
    xargs = dict(body.vllm_xargs or {})
    return_values = body.return_values
    if "return_values" in xargs:
        value = xargs.pop("return_values")
        if not isinstance(value, bool):
            raise ApiError(400, "vllm_xargs.return_values must be true or false", "vllm_xargs")
        if "return_values" in body.model_fields_set:  # neither wins, as for the length keys
            raise ApiError(400, "return_values is given both as a field and in vllm_xargs", "return_values")
        return_values = value
    unknown = sorted(k for k in xargs if not k.startswith("length_"))
    if unknown:
        raise ApiError(
            400,
            f"unknown vllm_xargs key {quoted(unknown[0])}; expected {', '.join(LENGTH_KEYS)} or "
            "return_values",
            "vllm_xargs",
        )
    both = sorted(set(top) & {k for k, v in xargs.items() if v is not None})
    if both:
        raise ApiError(400, f"{both[0]} is given both as a field and in vllm_xargs", both[0])
    return {**xargs, **top}, return_values


def prompt_list(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    """One prompt (text or token ids) or a list of them, as a list."""
    if isinstance(prompt, str):
        return [prompt]
    if prompt and isinstance(prompt[0], int):
        return [cast(list[int], prompt)]  # validated as one of the types: all of it ints
    return cast(list[str | list[int]], prompt)  # a list of texts or of token-id lists


def _completion_prompts(body: CompletionRequest) -> list[str | list[int]]:
    """A completion's prompts as sent (text or token ids), counted, not yet tokenized."""
    prompts = prompt_list(body.prompt)
    if not prompts:
        raise ApiError(400, "the prompt is empty", "prompt")
    if len(prompts) > MAX_PROMPTS:
        raise ApiError(400, f"at most {MAX_PROMPTS} prompts in one request", "prompt")
    return prompts


def text_prompt_ids(
    prompt: str | list[int], ctx: Context, add_special_tokens: bool = True, what: str = "prompt"
) -> list[int]:
    """A text completion's prompt: text tokenized as is (no chat template), or token ids (the
    engine's vocabulary: the ids its models embed). Any text is a prompt, whitespace alone included
    (as in OpenAI's API): only one that comes to no tokens is refused, as the engine refuses it."""
    if isinstance(prompt, str):
        ids = tokenize(prompt, ctx, add_special_tokens)
    elif (why := outside_vocabulary(prompt, ctx.vocab_size, f"the {what}")) is not None:
        raise ApiError(400, why, what)
    else:
        ids = list(prompt)
    return _some_tokens(ids, what)


def tokenize(text: str, ctx: Context, add_special_tokens: bool = True) -> list[int]:
    """``text`` tokenized as is (no chat template)."""
    with ctx.tokenizer_lock:
        return list(ctx.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def template_arguments(body: _Templated) -> dict[str, Any]:
    """The variables a request passes to the chat template: its ``chat_template_kwargs``, and
    ``reasoning_effort`` as the variable of that name; as vLLM does, an effort also sets
    ``enable_thinking`` (off for ``"none"``, on otherwise) unless the kwargs set it. The server's
    defaults go under these (:func:`chat_prompt_ids`), so that an effort outweighs a default
    ``enable_thinking``."""
    kwargs = dict(body.chat_template_kwargs or {})
    if (why := template_kwargs_problem(kwargs)) is not None:
        raise ApiError(400, why, "chat_template_kwargs")
    if body.reasoning_effort is not None:
        if "reasoning_effort" in kwargs:  # neither wins, as for the length keys
            raise ApiError(
                400,
                "reasoning_effort is given both as a field and in chat_template_kwargs",
                "reasoning_effort",
            )
        kwargs["reasoning_effort"] = body.reasoning_effort
        kwargs.setdefault("enable_thinking", body.reasoning_effort != "none")
    return kwargs


def refuse_template_arguments(body: _Templated) -> None:
    """Refuse template arguments with a text prompt, which no chat template reads (empty kwargs
    ask for nothing: taken; any effort asks for one)."""
    if body.chat_template_kwargs:
        name = "chat_template_kwargs"
    elif body.reasoning_effort is not None:
        name = "reasoning_effort"
    else:
        return
    raise ApiError(
        400, f"{name} goes with messages: a text prompt is tokenized as is, without the chat template", name
    )


def merged_template_kwargs(defaults: dict[str, Any], given: dict[str, Any] | None) -> dict[str, Any]:
    """A request's chat template arguments over the server's defaults, as vLLM merges them: where
    there are defaults, a request's ``null`` or ``"auto"`` leaves its variable unset by the request
    (the default, if any, stays); without defaults the request's arguments go as they are."""
    if not defaults:
        return dict(given or {})
    return {**defaults, **{k: v for k, v in (given or {}).items() if v is not None and v != "auto"}}


def chat_prompt_ids(
    messages: list[ChatMessage],
    ctx: Context,
    template_kwargs: dict[str, Any] | None = None,
    *,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
) -> list[int]:
    """Chat messages through the chat template, with ``template_kwargs`` (its variables, over the
    server's defaults: vLLM's merge) and the generation prompt unless ``add_generation_prompt`` is
    off; ``continue_final_message`` leaves the last message open. A message's content may be empty
    or whitespace (as in OpenAI's API; lenvm's prompt files refuse a prompt without text, which
    rollouts and training could not use)."""
    if not messages:
        raise ApiError(400, "messages must be a non-empty list", "messages")
    records = [{"role": m.role, "content": _content(m.content)} for m in messages]
    template_kwargs = merged_template_kwargs(ctx.template_defaults, template_kwargs)
    try:
        prompt = Prompt("0", messages=records, chat_template_kwargs=template_kwargs)
        with ctx.tokenizer_lock:
            ids = encode_prompt(
                ctx.tokenizer,
                prompt,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
            )
    except InputError as err:
        raise ApiError(400, str(err), "messages") from None
    except Exception as err:  # the chat template refused the conversation (roles, order) or its arguments
        what = "these messages and arguments" if template_kwargs else "these messages"
        raise ApiError(400, f"the chat template refused {what}: {err}", "messages") from None
    return _some_tokens(ids, "prompt", "messages")


def _some_tokens(ids: list[int], what: str, param: str | None = None) -> list[int]:
    if not ids:
        raise ApiError(400, f"the {what} encodes to no tokens", param or what)
    return ids


def _content(content: str | list[TextPart] | None) -> str:
    if content is None:
        return ""
    return content if isinstance(content, str) else "".join(part.text for part in content)


# -- answers ----------------------------------------------------------------------------------


@dataclass
class _Answer:
    """One choice's chunks put together (a non-streaming answer)."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    pieces: list[str] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top: list[list[tuple[int, float]]] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    finish: Finish | None = None

    def add(self, chunk: Chunk) -> None:
        self.token_ids += chunk.token_ids
        self.text += chunk.text
        self.pieces += chunk.pieces
        self.logprobs += chunk.logprobs
        self.top += chunk.top_logprobs or []
        self.values += chunk.values or []
        self.finish = chunk.finish or self.finish


class Writer:
    """Writes one generation request's answer, whole or as stream chunks."""

    def __init__(self, plan: Plan, model: str, tokenizer):
        self.plan = plan
        self.model = model
        self.tokenizer = tokenizer
        chat = plan.endpoint == "chat"
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.object = "chat.completion" if chat else "text_completion"
        self.created = int(time.time())
        self.offsets = [0] * len(plan.choices)  # text completions' logprobs: each choice's text offset
        self.streamed: list[Finish | None] = [None] * len(plan.choices)  # a stream's finishes so far
        self.streamed_tokens = 0

    # -- whole ---------------------------------------------------------------------------

    def answer(self, chunks: list[Chunk]) -> dict[str, Any]:
        answers = [_Answer() for _ in self.plan.choices]
        for chunk in chunks:
            answers[chunk.index].add(chunk)
        choices = [self._choice(i, a.text, a, a.finish, whole=True) for i, a in enumerate(answers)]
        return {
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": self.usage([a.finish for a in answers]),
        }

    def usage(self, finishes: list[Finish | None]) -> dict[str, int]:
        completion = sum(f.completion_tokens for f in finishes if f is not None)
        return self._usage(completion, finishes)

    def _usage(self, completion: int, finishes: list[Finish | None]) -> dict[str, int]:
        return {
            "prompt_tokens": self.plan.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.plan.prompt_tokens + completion,
            "discarded_tokens": sum(f.discarded_tokens for f in finishes if f is not None),
        }

    # -- streamed ------------------------------------------------------------------------

    def opening(self) -> list[dict[str, Any]]:
        """Chat streams open each choice with the assistant's role (as OpenAI and vLLM do)."""
        if self.plan.endpoint != "chat":
            return []
        return [
            self._streamed(
                {
                    "index": i,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
            )
            for i in range(len(self.plan.choices))
        ]

    def chunk(self, chunk: Chunk) -> dict[str, Any]:
        answer = _Answer()
        answer.add(chunk)
        self.streamed_tokens += len(chunk.token_ids)
        if chunk.finish is not None:
            self.streamed[chunk.index] = chunk.finish
        return self._streamed(self._choice(chunk.index, chunk.text, answer, chunk.finish, whole=False))

    def usage_chunk(self) -> dict[str, Any]:
        """The stream's last chunk: no choices, the usage of the whole answer."""
        return {**self._envelope(None), "choices": [], "usage": self.usage(self.streamed)}

    def _streamed(self, choice: dict[str, Any]) -> dict[str, Any]:
        """A stream chunk of ``choice``, with the usage so far where it was asked for."""
        envelope = self._envelope(choice)
        if self.plan.continuous_usage:
            envelope["usage"] = self._usage(self.streamed_tokens, self.streamed)
        return envelope

    def _envelope(self, choice: dict[str, Any] | None) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion.chunk" if self.plan.endpoint == "chat" else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [choice] if choice is not None else [],
        }

    # -- one choice ----------------------------------------------------------------------

    def _choice(
        self, index: int, text: str, answer: _Answer, finish: Finish | None, whole: bool
    ) -> dict[str, Any]:
        chat = self.plan.endpoint == "chat"
        out: dict[str, Any] = {"index": index}
        if chat:
            out["message" if whole else "delta"] = (
                {"role": "assistant", "content": text} if whole else {"content": text}
            )
        else:
            out["text"] = text
        out["logprobs"] = self._logprobs(index, answer) if self.plan.logprobs is not None else None
        out["finish_reason"] = finish.reason if finish is not None else None
        out["stop_reason"] = finish.stop_string if finish is not None else None
        if self.plan.choices[index].request.return_values:
            out["values"] = answer.values
        if self.plan.controlled and finish is not None:
            out["length"] = {
                "num_tokens": finish.num_tokens,
                "retries": finish.retries,
                "eos_prob": finish.eos_prob,
                "capped": finish.capped,
            }
        return out

    def _tokens(self, token_ids: list[int]) -> list[str]:
        """The tokens' own strings, as vLLM writes them: each token's text alone with its leading
        space kept (clients join them), or ``token_id:N``."""
        if self.plan.token_ids_as_text:
            return [f"token_id:{t}" for t in token_ids]
        return token_texts_alone(self.tokenizer, token_ids)

    def _logprobs(self, index: int, answer: _Answer) -> dict[str, Any]:
        ids, pieces = answer.token_ids, answer.pieces
        tops = answer.top or [[] for _ in ids]
        own = self._tokens(ids)
        tokens = own if self.plan.token_ids_as_text else self._token_strings(ids, pieces, own)
        # Each alternative named once, however often it comes (a whole answer's n x tokens x top).
        alternatives = list(dict.fromkeys(t for top in tops for t, _ in top))
        if self.plan.endpoint == "chat":
            named = {
                t: (name, self._chat_bytes(t, name))
                for t, name in zip(alternatives, self._tokens(alternatives), strict=True)
            }
            return {
                "content": [
                    {
                        **self._chat_logprob(i, token, logprob),
                        "top_logprobs": [
                            {"token": named[t][0], "logprob": lp, "bytes": named[t][1]} for t, lp in top
                        ],
                    }
                    for i, token, logprob, top in zip(ids, tokens, answer.logprobs, tops, strict=True)
                ]
            }
        names = dict(zip(alternatives, self._alternatives(alternatives), strict=True))
        offsets = []
        for piece in pieces:
            offsets.append(self.offsets[index])
            self.offsets[index] += len(piece)
        return {
            "tokens": tokens,
            "token_logprobs": answer.logprobs,
            # vLLM's shape: the alternatives and the chosen token, by token string
            "top_logprobs": [
                {**{names[t]: lp for t, lp in top if t != i}, token: logprob}
                for i, token, logprob, top in zip(ids, tokens, answer.logprobs, tops, strict=True)
            ],
            "text_offset": offsets,
        }

    def _token_strings(self, ids: list[int], pieces: list[str], own: list[str]) -> list[str]:
        """Each token as its piece of the text, so that the tokens join into the text and a
        completion's text_offset counts along them. Past the text's end (a stop string cut it) a
        token reads "", but the EOS that ended the answer reads as itself, taking no room. A chat
        token that writes part of a character reads as itself (U+FFFD): its own bytes, joined,
        give the content's."""
        special = set(self.tokenizer.all_special_ids)
        within = max((k for k, piece in enumerate(pieces, 1) if piece), default=0)  # tokens in the text
        chat = self.plan.endpoint == "chat"
        return [
            (name if chat and "\ufffd" in name else piece)
            if k < within
            else (name if i in special else piece)
            for k, (i, piece, name) in enumerate(zip(ids, pieces, own, strict=True))
        ]

    def _alternatives(self, ids: list[int]) -> list[str]:
        """Alternative tokens by their own strings; a piece of a character (alone, U+FFFD) by its
        bytes, as OpenAI writes it (``bytes:\\xe6\\xb5``), so that different pieces stay apart."""
        names = self._tokens(ids)
        for k, (i, name) in enumerate(zip(ids, names, strict=True)):
            raw = (
                None
                if self.plan.token_ids_as_text or "\ufffd" not in name
                else token_bytes(self.tokenizer, i)
            )
            if raw is not None:
                names[k] = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
        return names

    def _chat_logprob(self, token_id: int, token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": self._chat_bytes(token_id, token)}

    def _chat_bytes(self, token_id: int, token: str) -> list[int]:
        # A piece of a character reads as U+FFFD: its own bytes (OpenAI's) let clients put the
        # character together from the pieces.
        raw = (
            None
            if self.plan.token_ids_as_text or "\ufffd" not in token
            else token_bytes(self.tokenizer, token_id)
        )
        return list(raw or token.encode("utf-8"))
