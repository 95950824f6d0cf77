"""`lenvm serve` driven over a real socket on 127.0.0.1 with the official `openai` client (and raw
HTTP where a client would not send such a request), against the tiny model."""

import asyncio
import codecs
import contextlib
import copy
import itertools
import json
import logging
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import httpx
import numpy as np
import openai
import pytest
import torch
import uvicorn
from conftest import sentencepiece_tokenizer
from hypothesis import given
from hypothesis import settings as run_with
from hypothesis import strategies as st

from lenvm.decoding import Control, Engine, Request, SamplingParams
from lenvm.decoding.policies import give_up
from lenvm.model import LengthValueModel
from lenvm.prompts import Prompt, encode_prompt
from lenvm.serve import ServerSettings, create_app, serve
from lenvm.serve.protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    Context,
    Plan,
    PredictRequest,
    Writer,
    merged_template_kwargs,
    parse,
    plan_completion,
)
from lenvm.serve.runner import Choice, Chunk
from lenvm.values_view import token_texts_alone, token_values

MODEL = "tiny"
HI = [{"role": "user", "content": "Tell me about the sea."}]


@contextmanager
def running(engine, **settings):
    """The app on a free port of 127.0.0.1, in a thread; yields (base URL, app)."""
    app = create_app(engine, ServerSettings(served_model_name=MODEL, **settings))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", app
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


@pytest.fixture(scope="module")
def lenvm(tiny_path, tiny_generator):
    return LengthValueModel.from_base(tiny_path, kind="attached", generator=tiny_generator)


@pytest.fixture(scope="module")
def engine(tiny_generator, lenvm):
    return Engine(*tiny_generator, lenvm=lenvm, num_candidates=4)


@pytest.fixture(scope="module")
def server(engine):
    with running(engine, batch_size=8) as (url, app):
        yield url, app


@pytest.fixture
def url(server):
    return server[0]


def client(url, **kwargs):
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60, **kwargs)


def healthy(url):
    assert httpx.get(url + "/health", timeout=10).status_code == 200
    answer = client(url).completions.create(model=MODEL, prompt="Hi", max_tokens=2)
    assert answer.choices[0].finish_reason in ("stop", "length") and answer.usage.completion_tokens >= 1


def alone(engine, prompt_ids, **sampling):
    """The engine's own answer, for comparison."""
    return engine.generate([Request(prompt_ids, SamplingParams(**sampling))])[0]


# -- generation --------------------------------------------------------------------------------


def test_text_completion_is_the_engines_answer_to_the_raw_prompt(url, engine, tiny_generator):
    tok = tiny_generator[1]
    answer = client(url).completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6, seed=3)
    raw = tok("Once upon a time")["input_ids"]  # tokenized as is: no chat template
    expected = alone(engine, raw, max_new_tokens=6, seed=3)
    assert answer.object == "text_completion" and answer.model == MODEL
    [choice] = answer.choices
    assert choice.text == expected.text and choice.finish_reason == "length"
    assert answer.usage.prompt_tokens == len(raw)
    assert answer.usage.completion_tokens == 6 and answer.usage.total_tokens == len(raw) + 6
    # token ids are a prompt too, and a batch of prompts gives one choice per prompt
    batch = client(url).completions.create(
        model=MODEL, prompt=[raw, tok("Hi")["input_ids"]], max_tokens=6, seed=3
    )
    assert [c.index for c in batch.choices] == [0, 1]
    assert batch.choices[0].text == expected.text
    # max_tokens left out near the end of the context: what the context leaves, as vLLM does
    near = client(url).completions.create(
        model=MODEL, prompt=[40] * 1020, seed=3, extra_body={"ignore_eos": True}
    )
    assert near.usage.completion_tokens == 4 and near.choices[0].finish_reason == "length"


def test_chat_completion_applies_the_chat_template(url, engine, tiny_generator):
    tok = tiny_generator[1]
    answer = client(url).chat.completions.create(model=MODEL, messages=HI, max_tokens=7, seed=5)
    ids = encode_prompt(tok, HI)
    expected = alone(engine, ids, max_new_tokens=7, seed=5)
    assert answer.object == "chat.completion"
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].message.content == expected.text
    assert answer.usage.prompt_tokens == len(ids)
    # null leaves a field at its default, as OpenAI's client sends it for arguments passed as None.
    nulls = {"n": None, "stream": None, "presence_penalty": None, "frequency_penalty": None}
    again = client(url).chat.completions.create(
        model=MODEL, messages=HI, max_tokens=7, seed=5, logprobs=None, **nulls
    )
    assert again.choices[0].message.content == expected.text
    text = client(url).completions.create(model=MODEL, prompt="Hi", max_tokens=3, echo=None, **nulls)
    assert len(text.choices) == 1
    # max_tokens left out: a chat answer may run to the end of the context (here until EOS)
    long = client(url).chat.completions.create(
        model=MODEL, messages=HI, seed=1, extra_body={"vllm_xargs": {"length_at_most": 12}}
    )
    assert long.usage.completion_tokens <= 13
    # an answer's message sent back as the client returns it (refusal, tool_calls, ... as null)
    follow_up = [*HI, long.choices[0].message.model_dump(), {"role": "user", "content": "More?"}]
    assert "refusal" in follow_up[1] and "tool_calls" in follow_up[1]
    conversation = [{"role": m["role"], "content": m["content"]} for m in follow_up]
    ids = encode_prompt(tok, conversation)
    expected = alone(engine, ids, max_new_tokens=4, seed=2)
    again = client(url).chat.completions.create(model=MODEL, messages=follow_up, max_tokens=4, seed=2)
    assert again.choices[0].message.content == expected.text


def test_streams_give_the_same_answer_token_by_token(url):
    c = client(url)
    whole = c.chat.completions.create(model=MODEL, messages=HI, max_tokens=12, seed=7)
    chunks = list(
        c.chat.completions.create(
            model=MODEL,
            messages=HI,
            max_tokens=12,
            seed=7,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [ch.choices[0].delta.content or "" for ch in chunks if ch.choices]
    assert "".join(content) == whole.choices[0].message.content
    # the opening, then a chunk per token, the pieces of a character in one with the last
    assert 1 + 6 < len(content) <= 1 + 12 and all(content[1:])
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    text = "".join(
        ch.choices[0].text
        for ch in c.completions.create(model=MODEL, prompt="Hi", max_tokens=5, seed=2, stream=True)
    )
    assert text == c.completions.create(model=MODEL, prompt="Hi", max_tokens=5, seed=2).choices[0].text


def test_length_controls_in_vllm_xargs_and_as_fields(url, engine, tiny_generator):
    tok = tiny_generator[1]
    c = client(url)
    ids = encode_prompt(tok, HI)
    answer = c.chat.completions.create(
        model=MODEL, messages=HI, max_tokens=30, seed=4, extra_body={"vllm_xargs": {"length_at_most": 5}}
    )
    expected = engine.generate(
        [Request(ids, SamplingParams(max_new_tokens=30, seed=4), control=Control("at_most", target=5))]
    )[0]
    choice = answer.choices[0]
    assert choice.message.content == expected.text
    assert choice.length["num_tokens"] == expected.num_tokens <= 5
    assert choice.finish_reason == "stop"  # the control ended it with an EOS
    as_field = c.chat.completions.create(
        model=MODEL, messages=HI, max_tokens=30, seed=4, extra_body={"length_at_most": 5}
    )
    assert as_field.choices[0].message.content == expected.text
    # Equal To with its retries: what was thrown away is reported apart from the answer
    equal = c.completions.create(
        model=MODEL, prompt="Hi", max_tokens=20, seed=1, extra_body={"vllm_xargs": {"length_equal_to": 6}}
    )
    retried = equal.choices[0].length["retries"]
    assert retried > 0  # the random model never ends naturally
    ended = equal.choices[0].finish_reason == "stop"
    assert equal.usage.completion_tokens == equal.choices[0].length["num_tokens"] + ended  # EOS counted
    assert equal.usage.discarded_tokens > 0


def test_a_hard_cap_is_set_per_request(url, engine):
    capped = Control("equal_to", target=4, retries=0, hard_cap_slack=1)
    expected = engine.generate(
        [Request([40, 41], SamplingParams(max_new_tokens=20, seed=2), control=capped)]
    )[0]
    assert expected.finish_reason == "cap" and expected.num_tokens == 5  # the random model runs on
    for keys in (
        {"length_equal_to": 4, "length_retries": 0, "length_hard_cap_slack": 1},
        {"vllm_xargs": {"length_equal_to": 4, "length_retries": 0, "length_hard_cap_slack": 1}},
        {"length_at_most": 4, "length_rule": "paper", "length_hard_cap_slack": 1},  # the rule joins first
    ):
        answer = client(url).completions.create(
            model=MODEL, prompt=[40, 41], max_tokens=20, seed=2, extra_body=keys
        )
        [choice] = answer.choices
        assert choice.finish_reason == "stop" and choice.length["capped"], keys
        assert choice.length["num_tokens"] <= 5
        if "length_equal_to" in keys or "vllm_xargs" in keys:
            assert choice.text == expected.text
    for keys, message, param in [
        (
            {"length_equal_to": 4, "length_hard_cap_slack": -1},
            "non-negative integer",
            "length_hard_cap_slack",
        ),
        ({"length_equal_to": 4, "length_hard_cap_slack": "1"}, "integer", "length_hard_cap_slack"),
        ({"length_equal_to": 4, "length_hard_cap_slack": 1.5}, "integer", "length_hard_cap_slack"),
        ({"length_at_most": 4, "length_hard_cap_slack": 1}, "rule 'paper'", "length_hard_cap_slack"),
        ({"length_at_least": 4, "length_hard_cap_slack": 1}, "equal_to and at_most", "length_hard_cap_slack"),
        ({"length_hard_cap_slack": 1}, "needs a length control", "length_hard_cap_slack"),
        ({"vllm_xargs": {"length_equal_to": 4, "length_hard_cap_slack": -1}}, "non-negative", "vllm_xargs"),
        (
            {"length_equal_to": 4, "length_hard_cap_slack": 10**30},
            "at most",
            "length_hard_cap_slack",
        ),  # was a 500
    ]:
        response = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "Hi", **keys})
        error = response.json()["error"]
        assert response.status_code == 400 and message in error["message"] and error["param"] == param, keys


@pytest.mark.parametrize("key", ["length_equal_to", "length_at_most", "length_at_least"])
def test_streaming_a_target_control_streams_live_unless_retries_are_asked_for(url, key):
    c = client(url)
    body = {"vllm_xargs": {key: 6}}
    live = list(
        c.completions.create(model=MODEL, prompt="Hi", max_tokens=20, seed=1, stream=True, extra_body=body)
    )
    assert len(live) > 3 and live[-1].choices[0].length["retries"] == 0
    held = list(
        c.completions.create(
            model=MODEL,
            prompt="Hi",
            max_tokens=20,
            seed=1,
            stream=True,
            extra_body={**body, "length_retries": 2},
        )
    )
    assert len(held) == 1  # the final answer, once no retry can take it back
    assert held[0].choices[0].finish_reason == "stop"
    if key != "length_equal_to":
        return
    assert held[0].choices[0].length["retries"] == 2
    best = list(
        c.completions.create(
            model=MODEL,
            prompt="Hi",
            max_tokens=20,
            seed=1,
            stream=True,
            extra_body={"vllm_xargs": {"length_equal_to": 6, "length_best_of": 2, "length_retries": 0}},
        )
    )
    assert len(best) == 1


def test_values_and_logprobs(url, engine, lenvm, tiny_generator):
    tok = tiny_generator[1]
    c = client(url)
    answer = c.completions.create(
        model=MODEL, prompt="Hi", max_tokens=6, seed=9, logprobs=2, extra_body={"return_values": True}
    )
    choice = answer.choices[0]
    raw = tok("Hi")["input_ids"]
    expected = engine.generate([Request(raw, SamplingParams(max_new_tokens=6, seed=9), return_values=True)])[
        0
    ]
    assert choice.values == pytest.approx(expected.values, abs=1e-5)
    assert choice.logprobs.token_logprobs == pytest.approx(expected.logprobs, abs=1e-4)
    assert choice.logprobs.tokens == [tok.decode([t]) for t in expected.token_ids]
    starts = [sum(len(t) for t in choice.logprobs.tokens[:i]) for i in range(len(expected.token_ids))]
    assert choice.logprobs.text_offset == starts  # where each token starts in the text, as in OpenAI's
    assert all(
        len(top) <= 3 and top[t] == lp
        for top, t, lp in zip(
            choice.logprobs.top_logprobs, choice.logprobs.tokens, choice.logprobs.token_logprobs, strict=True
        )
    )
    ids = c.completions.create(
        model=MODEL,
        prompt="Hi",
        max_tokens=6,
        seed=9,
        logprobs=0,
        extra_body={"return_tokens_as_token_ids": True},
    )
    assert ids.choices[0].logprobs.tokens == [f"token_id:{t}" for t in expected.token_ids]
    chat = c.chat.completions.create(
        model=MODEL, messages=HI, max_tokens=4, seed=1, logprobs=True, top_logprobs=2
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(len(t.top_logprobs) == 2 for t in content)
    assert content[0].top_logprobs[0].logprob >= content[0].top_logprobs[1].logprob
    plain = c.chat.completions.create(model=MODEL, messages=HI, max_tokens=4, seed=1, logprobs=True)
    assert [t.top_logprobs for t in plain.choices[0].logprobs.content] == [[]] * 4  # no alternatives asked
    # logprobs false with top_logprobs 0 (as OpenAI clients may send it) asks for nothing
    quiet = c.chat.completions.create(model=MODEL, messages=HI, max_tokens=2, logprobs=False, top_logprobs=0)
    assert quiet.choices[0].logprobs is None
    streamed = list(
        c.completions.create(
            model=MODEL, prompt="Hi", max_tokens=6, seed=9, stream=True, extra_body={"return_values": True}
        )
    )
    assert [v for ch in streamed for v in ch.choices[0].values] == pytest.approx(expected.values, abs=1e-5)


@pytest.fixture(scope="module")
def sentencepiece_engine(tiny_path):
    """An engine whose tokenizer drops the space at the start of a text (as Llama's and Mistral's
    do), on a copy of the tiny model that greedily answers "▁a" (258), "a" (261) its runner-up."""
    from lenvm.hub import load_generator
    from lenvm.testing import CHATML_TEMPLATE

    tok = sentencepiece_tokenizer("strip first space")
    tok.chat_template = CHATML_TEMPLATE
    model, _ = load_generator(tiny_path)
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    model.generation_config.eos_token_id = tok.eos_token_id
    with torch.no_grad():  # as tiny_model's eos_logit: a feature every hidden state has, weighed more
        embeddings = model.get_input_embeddings().weight
        embeddings[:, 0] = 1.0
        embeddings[258, 0] += 4.0
        embeddings[261, 0] += 3.0
    return Engine(model, tok, num_candidates=4)


def test_an_answer_reads_as_the_continuation_of_its_prompt(sentencepiece_engine):
    """A SentencePiece decoder drops the space at the start of a text: the answer is decoded after
    the end of its prompt (as vLLM decodes it), so that "▁a" after "a b" reads " a" and the prompt's
    text and the answer's join into the whole text; each token keeps the space its "▁" stands for."""
    with running(sentencepiece_engine) as (url, _):

        def post(route, body):
            answer = httpx.post(
                f"{url}/v1/{route}", json={"model": MODEL, "max_tokens": 3, **body}, timeout=60
            )
            assert answer.status_code == 200, answer.text
            return answer.json()["choices"][0]

        prompt = [258, 259]
        text = post("completions", {"prompt": prompt, "logprobs": 2})
        tok = sentencepiece_engine.tokenizer
        assert tok.decode(prompt) + text["text"] == tok.decode(prompt + [258] * 3) == "a b a a a"
        logprobs = text["logprobs"]
        assert logprobs["tokens"] == [" a", " a", " a"] and logprobs["text_offset"] == [0, 2, 4]
        assert all(set(top) == {" a", "a"} for top in logprobs["top_logprobs"])
        chat = post("chat/completions", {"messages": HI, "logprobs": True, "top_logprobs": 2})
        content = chat["logprobs"]["content"]
        assert chat["message"]["content"] == " a a a" == "".join(t["token"] for t in content)
        assert content[0]["bytes"] == [32, 97]
        assert [[alt["token"] for alt in t["top_logprobs"]] for t in content] == [[" a", "a"]] * 3


def written(tokenizer, endpoint, pieces, top=0, prompt=(1,), stops=(), alternatives=(), control=None):
    """A Writer's answer for the token ids ``pieces`` (one list per engine step, the last one
    ending the answer) after ``prompt``, in one answer and as a stream, through the server's own
    tracker: the choice as a whole and the stream's chunks. Each token's alternatives are itself
    and ``alternatives``."""
    from lenvm.decoding.engine import Update
    from lenvm.decoding.params import Result
    from lenvm.serve.runner import _Tracker

    choice = Choice(Request(list(prompt), SamplingParams(top_logprobs=top), control), tuple(stops))
    plan = Plan(endpoint, [choice], 1, False, False, top, False, False)
    tracker, chunks, ids, all_tops = _Tracker(0, choice, tokenizer), [], [], []
    for k, piece in enumerate(pieces):
        tops = [[(i, -1.0)] * top + [(a, -2.0) for a in alternatives] for i in piece]
        start, ids, all_tops = len(ids), ids + piece, all_tops + tops
        ended = k == len(pieces) - 1
        lps = [-0.5] * len(ids)
        text = tokenizer.decode(ids, skip_special_tokens=True)  # as the engine writes it
        result = Result(
            list(prompt), ids, text, len(ids), "length", None, -0.5, logprobs=lps, top_logprobs=all_tops
        )
        update = Update(
            "k", 0, start, piece, result if ended else None, lps[start:], tops, [0.0] * len(piece)
        )
        chunk = tracker.update(update)
        chunks += [chunk] if chunk is not None else []
        if chunk is not None and chunk.finish is not None:
            break
    whole = Writer(plan, MODEL, tokenizer).answer(chunks)["choices"][0]
    streamed = Writer(plan, MODEL, tokenizer)
    return whole, [streamed.chunk(c)["choices"][0] for c in chunks]


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_a_whole_answer_names_each_alternative_token_once(endpoint, tiny_generator, monkeypatch):
    """Decoding the alternatives token by token made a big answer with logprobs take seconds."""
    from lenvm.serve import protocol

    tokenizer = tiny_generator[1]
    decoded = []

    def counted(tokenizer, ids):
        decoded.append(len(ids))
        return token_texts_alone(tokenizer, ids)

    monkeypatch.setattr(protocol, "token_texts_alone", counted)
    ids = list(range(40, 90))
    pieces = [tokenizer.decode([i]) for i in ids]
    tops = [[(i, -0.1), (i + 1, -2.0), (7, -3.0)] for i in ids]
    chunk = Chunk(0, ids, "".join(pieces), pieces, [-0.1] * len(ids), tops, None)
    plan = Plan(
        endpoint, [Choice(Request([1], SamplingParams(top_logprobs=3)), ())], 1, False, False, 3, False, False
    )
    answer = Writer(plan, MODEL, tokenizer).answer([chunk])["choices"][0]["logprobs"]
    assert len(decoded) == 2 and decoded[1] == len(ids) + 2  # its own tokens, then each alternative once
    first = answer["content"][0]["top_logprobs"] if endpoint == "chat" else answer["top_logprobs"][0]
    assert len(first) == 3


def lined_up(whole, streamed, eos=None):
    """Completion logprobs as clients of OpenAI and vLLM read them, in the answer and in its stream
    put together: the tokens joined give the text, text_offset[i] is where token i starts in it
    (monotone, within the text), and the EOS that ended it (which the text leaves out) comes last,
    where the text ends. Returns the answer's tokens."""
    streamed_logprobs = {
        k: [x for c in streamed for x in c["logprobs"][k]] for k in ("tokens", "text_offset")
    }
    for text, logprobs in [
        (whole["text"], whole["logprobs"]),
        ("".join(c["text"] for c in streamed), streamed_logprobs),
    ]:
        tokens, offsets = logprobs["tokens"], logprobs["text_offset"]
        if eos is not None:
            assert tokens[-1] == eos and offsets[-1] == len(text)
            tokens, offsets = tokens[:-1], offsets[:-1]
        assert "".join(tokens) == text
        assert offsets == sorted(offsets) and all(0 <= o <= len(text) for o in offsets)
        assert [text[o : o + len(t)] for o, t in zip(offsets, tokens, strict=True)] == tokens
    assert streamed_logprobs["tokens"] == whole["logprobs"]["tokens"]
    return whole["logprobs"]["tokens"]


@pytest.mark.parametrize("kind", ["sentencepiece", "byte-level BPE"])
def test_completion_logprob_tokens_join_into_the_text_at_their_offsets(kind, tiny_generator):
    """OpenAI's invariant: the tokens, joined, give the text, and text_offset is where each starts."""
    if kind == "sentencepiece":
        tok, pieces = sentencepiece_tokenizer("strip first space"), [[258], [259, 261], [258]]
    else:
        tok = tiny_generator[1]
        pieces = [tok.encode(t, add_special_tokens=False) for t in (" Once", " upon a", " time")]
    lined_up(*written(tok, "completions", pieces, top=1))
    chat, _ = written(tok, "chat", pieces)
    assert "".join(t["token"] for t in chat["logprobs"]["content"]) == chat["message"]["content"]


@pytest.mark.parametrize("steps", ["token by token", "all at once"])
def test_completion_logprobs_of_characters_split_over_tokens_line_up_with_the_text(steps, tiny_generator):
    """海 and 😀 take 3 and 4 byte tokens: a token inside a character reads "" and the one that
    completes it the whole character (as vLLM writes them), so that each piece's offset is where
    its character starts (OpenAI's offsets); the EOS reads as itself where the text ends."""
    tok = tiny_generator[1]
    ids = tok.encode("a海b 😀 c", add_special_tokens=False)
    assert len(ids) == 12  # the case under test: 海 in 3 tokens, 😀 in 4
    answer = [*ids, tok.eos_token_id]
    pieces = [[t] for t in answer] if steps == "token by token" else [answer]
    whole, streamed = written(tok, "completions", pieces, top=1, alternatives=ids[1:3])
    assert whole["text"] == "a海b 😀 c"
    tokens = lined_up(whole, streamed, eos="<|im_end|>")
    assert tokens[:4] == ["a", "", "", "海"] and whole["logprobs"]["text_offset"][:5] == [0, 1, 1, 1, 2]
    # alternatives that are pieces of a character read as OpenAI writes them, each apart
    top = whole["logprobs"]["top_logprobs"]
    assert top[0] == {"a": -0.5, "bytes:\\xe6": -2.0, "bytes:\\xb5": -2.0}
    assert top[1] == {"": -0.5, "bytes:\\xb5": -2.0}  # the chosen token once, by its string


@pytest.mark.parametrize("held", [False, True])
def test_completion_logprobs_end_where_a_stop_string_cuts_the_text(held):
    """The token that holds the start of a stop string reads the part of it before the cut, and
    tokens past the cut read "", all at the text's end; in a stream, tokens wait with their text
    for what the stop string may cut (a held answer is cut once final)."""
    tok = sentencepiece_tokenizer("strip first space")
    ids = [258, 259, 258, 258, 261]  # "a b a aa": "▁b" holds the start of "b a", "▁a" its end
    control = Control("equal_to", 4) if held else None
    whole, streamed = written(tok, "completions", [[t] for t in ids], top=1, stops=["b a"], control=control)
    assert whole["text"] == "a " and whole["finish_reason"] == "stop"
    assert lined_up(whole, streamed) == ["a", " ", ""]


def test_a_special_token_within_the_text_reads_as_the_nothing_it_adds(tiny_generator):
    """A special token in the middle of an answer (the text leaves it out) reads "", so that the
    tokens join into the text and their bytes into the content; only the EOS at the end reads as
    itself."""
    tok = tiny_generator[1]
    ids = [*tok.encode("a", add_special_tokens=False), tok.convert_tokens_to_ids("<|im_start|>")]
    ids += [*tok.encode("b", add_special_tokens=False), tok.eos_token_id]
    whole, streamed = written(tok, "completions", [[t] for t in ids], top=1)
    assert lined_up(whole, streamed, eos="<|im_end|>") == ["a", "", "b", "<|im_end|>"]
    chat, _ = written(tok, "chat", [[t] for t in ids])
    assert [t["token"] for t in chat["logprobs"]["content"]] == ["a", "", "b", "<|im_end|>"]


@pytest.mark.parametrize("steps", ["token by token", "all at once"])
def test_an_answer_that_ends_inside_a_character_lines_up_with_its_text(steps, tiny_generator):
    """An EOS after the first byte of 海: the text ends in U+FFFD, which the byte's token reads,
    in the answer and in its stream (the token waits for its text, not sent as "" before it)."""
    tok = tiny_generator[1]
    answer = [*tok.encode("a海", add_special_tokens=False)[:2], tok.eos_token_id]
    pieces = [[t] for t in answer] if steps == "token by token" else [answer]
    whole, streamed = written(tok, "completions", pieces, top=1)
    assert whole["text"] == "a\ufffd"
    assert lined_up(whole, streamed, eos="<|im_end|>") == ["a", "\ufffd", "<|im_end|>"]


@pytest.mark.parametrize("stops", [(), ("ZZ",)])
def test_a_stream_sends_each_token_with_its_text(stops):
    """Each chunk's text is its tokens' pieces, also while a stop string holds back the end of the
    text (text waits for its token, not only the token for its text)."""
    tok = sentencepiece_tokenizer("strip first space")
    whole, streamed = written(
        tok, "completions", [[t] for t in [258, 259, 258, 258, 261]], top=1, stops=stops
    )
    assert whole["text"] == "a b a aa"
    lined_up(whole, streamed)
    assert len(streamed) > 2 and all(c["text"] == "".join(c["logprobs"]["tokens"]) for c in streamed)


def test_an_answer_that_completes_the_prompts_last_character_starts_with_it(tiny_generator):
    """A token-id prompt may end inside a character: the answer's text starts with the whole
    character (as vLLM decodes it), not with U+FFFD for the bytes the prompt did not have."""
    tok = tiny_generator[1]
    ids = tok.encode("海 a", add_special_tokens=False)
    assert tok.decode(ids[:2]) == "\ufffd"  # the case under test: 海 in 3 tokens
    whole, streamed = written(tok, "completions", [[t] for t in ids[2:]], top=1, prompt=ids[:2])
    assert whole["text"] == "海 a"
    assert lined_up(whole, streamed)[0] == "海"


def test_chat_logprob_bytes_of_a_character_split_over_tokens_rebuild_it(tiny_generator):
    """A piece of a character reads as U+FFFD; its bytes are its own, as in OpenAI's answers."""
    for tok, ids in [
        (tiny_generator[1], tiny_generator[1].encode("海 a", add_special_tokens=False)),  # byte-level BPE
        (sentencepiece_tokenizer("byte fallback"), [2 + b for b in "海".encode()] + [258]),  # <0xNN>
    ]:
        whole, _ = written(tok, "chat", [ids], top=1)
        content = whole["logprobs"]["content"]
        assert len(content) == len(ids) > 2 and content[0]["token"] == "\ufffd"
        assert bytes(b for t in content for b in t["bytes"]).decode() == "海 a"
        assert bytes(content[0]["top_logprobs"][0]["bytes"]) == "海".encode()[:1]


@pytest.mark.parametrize(
    "kind, stop, content, tokens",
    [("sentencepiece", "b a", "a ", ["a", " ", ""]), ("byte-level BPE", "海", "a", ["a", "", "", ""])],
)
def test_chat_logprobs_end_where_a_stop_string_cuts_the_content(kind, stop, content, tokens, tiny_generator):
    """Tokens past the cut read "" with no bytes (a piece of a character among them too), so that
    the tokens' bytes join into the content's UTF-8, in the answer and in its stream."""
    if kind == "sentencepiece":
        tok, ids = sentencepiece_tokenizer("strip first space"), [258, 259, 258, 258, 261]
    else:
        tok = tiny_generator[1]
        ids = tok.encode("a海b", add_special_tokens=False)
    whole, streamed = written(tok, "chat", [[t] for t in ids], top=1, stops=[stop])
    assert whole["message"]["content"] == "".join(c["delta"]["content"] for c in streamed) == content
    for logprobs in [whole["logprobs"]["content"], [t for c in streamed for t in c["logprobs"]["content"]]]:
        assert [t["token"] for t in logprobs] == tokens
        assert bytes(b for t in logprobs for b in t["bytes"]) == content.encode()


def test_return_values_in_vllm_xargs_or_as_a_field_but_not_both(url):
    """vllm_xargs.return_values asks as the field does; given in both places it is refused, as
    a length key is, whatever the two say."""

    def answer(keys):
        return httpx.post(
            url + "/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 3, **keys}
        )

    for keys, wanted in [
        ({"vllm_xargs": {"return_values": True}}, True),
        ({"vllm_xargs": {"return_values": False}}, False),
        ({"return_values": True}, True),
        ({"return_values": None, "vllm_xargs": {"return_values": True}}, True),  # null: left out
        ({"return_values": False}, False),
    ]:
        response = answer(keys)
        assert response.status_code == 200, (keys, response.text)
        assert ("values" in response.json()["choices"][0]) == wanted, keys
    for top, xarg in [(True, False), (False, True), (True, True), (False, False)]:
        response = answer({"return_values": top, "vllm_xargs": {"return_values": xarg}})
        error = response.json()["error"]
        assert response.status_code == 400 and error["param"] == "return_values", (top, xarg)
        assert error["message"] == "return_values is given both as a field and in vllm_xargs"


def test_a_text_prompt_as_long_as_the_context_is_refused_by_name(url, engine, tiny_generator):
    """A prompt of the whole context leaves no room for one token: the context's own message,
    not a generic one; one token shorter is served."""
    tok = tiny_generator[1]
    for length in (engine.context, engine.context - 1):
        prompt = "a" * length
        assert len(tok(prompt)["input_ids"]) == length  # one token per letter
        for max_tokens in ({}, {"max_tokens": 1}):
            response = httpx.post(
                url + "/v1/completions", json={"model": MODEL, "prompt": prompt, **max_tokens}, timeout=60
            )
            if length == engine.context:
                assert response.status_code == 400 and response.json()["error"] == {
                    "message": f"the prompt has {length} tokens; this model's context is {length} tokens",
                    "type": "invalid_request_error",
                    "param": "prompt",
                    "code": 400,
                }
            else:
                assert response.status_code == 200, response.text
                assert response.json()["usage"] == {
                    "prompt_tokens": length,
                    "completion_tokens": 1,
                    "total_tokens": length + 1,
                    "discarded_tokens": 0,
                }


def test_stop_strings_end_the_answer_before_them(url):
    c = client(url)
    full = c.completions.create(model=MODEL, prompt="Hi", max_tokens=30, seed=11).choices[0].text
    stop = full[10:12]
    cut = full[: full.index(stop)]
    for stream in (False, True):
        answer = c.completions.create(
            model=MODEL, prompt="Hi", max_tokens=30, seed=11, stop=[stop, "never"], stream=stream
        )
        chunks = list(answer) if stream else [answer]
        assert "".join(ch.choices[0].text for ch in chunks) == cut
        assert chunks[-1].choices[0].finish_reason == "stop"
        assert chunks[-1].choices[0].stop_reason == stop
    # a held answer (Equal To with retries) is cut the same way, once final
    held = c.completions.create(
        model=MODEL, prompt="Hi", max_tokens=30, seed=11, stop=" ", extra_body={"length_equal_to": 20}
    )
    latest_end = int(give_up("equal_to", torch.tensor(20)))  # the last step an unnatural EOS waits for
    assert " " not in held.choices[0].text and held.usage.completion_tokens <= latest_end + 1


def test_stop_strings_kept_in_the_text_when_asked(url):
    """vLLM's include_stop_str_in_output: the answer ends with the stop string instead of before it."""
    c = client(url)
    full = c.completions.create(model=MODEL, prompt="Hi", max_tokens=30, seed=11).choices[0].text
    stop = full[10:12]
    kept = full[: full.index(stop) + len(stop)]
    keep = {"include_stop_str_in_output": True}
    for stream in (False, True):
        answer = c.completions.create(
            model=MODEL, prompt="Hi", max_tokens=30, seed=11, stop=stop, stream=stream, extra_body=keep
        )
        chunks = list(answer) if stream else [answer]
        assert "".join(ch.choices[0].text for ch in chunks) == kept
        assert chunks[-1].choices[0].stop_reason == stop
    equal = {"length_equal_to": 20}  # a held answer (Equal To with retries), cut once final
    whole = c.completions.create(model=MODEL, prompt="Hi", max_tokens=30, seed=11, extra_body=equal)
    stop = whole.choices[0].text[5:7]
    held = c.completions.create(
        model=MODEL, prompt="Hi", max_tokens=30, seed=11, stop=stop, extra_body={**equal, **keep}
    )
    text = whole.choices[0].text
    assert held.choices[0].text == text[: text.index(stop) + len(stop)]


@pytest.mark.parametrize("stop, expected", [("你好", "a"), ("a你", ""), ("好", "a你"), ("\ufffd", "a你好b")])
def test_stop_strings_with_characters_split_across_tokens(stop, expected):
    """你 and 好 take three byte tokens each: nothing of a stop string goes out before it is
    complete, and a character not yet complete (U+FFFD until then) matches no stop string."""
    from lenvm.decoding.engine import Update
    from lenvm.serve.runner import Choice, _Tracker
    from lenvm.testing import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    ids = tokenizer("a你好b", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids[:2]) == "a\ufffd"  # the case under test: a character split
    tracker = _Tracker(0, Choice(Request([1], SamplingParams(max_new_tokens=20)), (stop,)), tokenizer)
    sent, finish = "", None
    for k, token in enumerate(ids):
        chunk = tracker.update(Update("k", 0, k, [token], logprobs=[0.0], top_logprobs=[[]], values=[0.0]))
        sent += chunk.text if chunk is not None else ""
        if chunk is not None and chunk.finish is not None:
            finish = chunk.finish
            break
    assert sent == expected
    assert (finish is not None) == (stop in "a你好b")


def tracked(tracker, updates, eos=None):
    """The chunks of ``tracker`` for ``updates`` ((start, token ids) each; the last ends the answer,
    with ``eos`` after its tokens where given), up to the one that finishes."""
    from lenvm.decoding.engine import Update
    from lenvm.decoding.params import Result

    ids, chunks = [], []
    for k, (start, tokens) in enumerate(updates):
        last = k == len(updates) - 1
        tokens = tokens + [eos] if last and eos is not None else tokens
        ids = ids[:start] + tokens
        n = len(tokens)
        result = Result(
            [1],
            ids,
            "",
            len(ids),
            "length" if eos is None else "stop",
            None,
            -0.5,
            logprobs=[-0.5] * len(ids),
        )
        update = Update("k", 0, start, tokens, result if last else None, [-0.5] * n, [[]] * n, [0.0] * n)
        chunk = tracker.update(update)
        chunks += [chunk] if chunk is not None else []
        if chunk is not None and chunk.finish is not None:
            break
    return chunks


def one_by_one(ids):
    """Updates of one token each."""
    return [(k, [t]) for k, t in enumerate(ids)]


@pytest.mark.parametrize(
    "text, stops, steps, sent, stop",
    [
        (" Once upon a time", ("ce up", "never"), 1, " On", "ce up"),  # over several tokens
        (" Once upon a time", ("ce up",), 4, " On", "ce up"),  # ... and several updates
        (" the sea" * 150 + " the end", ("end",), 1, " the sea" * 150 + " the ", "end"),  # late
        (" the sea", ("sea", "e s", "zz"), 3, " th", "e s"),  # the first to start wins
        (" the sea", ("e sea", "e s"), 1, " th", "e s"),  # ... of two at one place, the shorter
    ],
)
def test_stop_strings_end_the_stream_where_they_start(tiny_generator, text, stops, steps, sent, stop):
    from lenvm.serve.runner import _Tracker

    tok = tiny_generator[1]
    ids = tok.encode(text, add_special_tokens=False)
    choice = Choice(Request([1], SamplingParams(max_new_tokens=len(ids))), stops)
    updates = [(k, ids[k : k + steps]) for k in range(0, len(ids), steps)]
    chunks = tracked(_Tracker(0, choice, tok), updates)
    assert "".join(c.text for c in chunks) == sent and chunks[-1].finish.stop_string == stop


def test_a_stop_string_over_the_point_an_answer_was_cut_back_to_ends_it(tiny_generator):
    """An answer cut back (tokens replaced from a position) is searched from where a stop string
    could start before that position: "cy" ends "abcx" cut back to "abc" and then "y"."""
    from lenvm.serve.runner import _Tracker

    tok = tiny_generator[1]
    [a, b, c, x, y] = tok.encode("abcxy", add_special_tokens=False)
    choice = Choice(Request([1], SamplingParams(max_new_tokens=9)), ("cy", "xy"))
    updates = [*one_by_one([a, b, c, x]), (3, [y]), (4, [x])]  # the last one, never reached, would end it
    chunks = tracked(_Tracker(0, choice, tok), updates)
    assert chunks[-1].finish.stop_string == "cy" and chunks[-1].finish.completion_tokens == 4


def test_a_trackers_update_searches_only_its_new_text(tiny_generator, monkeypatch):
    """Each update of a long answer searches its new text for stop strings (with the characters
    before it where one could start), not the whole answer: its cost does not grow with it."""
    from lenvm.serve import runner

    searched, first_stop = [], runner.first_stop
    monkeypatch.setattr(
        runner, "first_stop", lambda text, stops: (searched.append(len(text)), first_stop(text, stops))[1]
    )
    tok = tiny_generator[1]
    ids = tok.encode(" the sea" * 200, add_special_tokens=False)
    choice = Choice(Request([1], SamplingParams(max_new_tokens=len(ids) + 1)), ("never",))
    chunks = tracked(runner._Tracker(0, choice, tok), one_by_one(ids) + [(len(ids), [])], tok.eos_token_id)
    assert "".join(c.text for c in chunks) == " the sea" * 200
    assert max(searched[:-1]) == len("never")  # the last update reads the whole answer, once


@st.composite
def updates_of_answers(draw, tok):
    """Token ids of text with characters split over tokens, as updates of 1 to 3 tokens, some
    cutting the answer back (replacing its tokens from a position), and stop strings (pieces of
    the text, or strings it may not hold)."""
    words = st.sampled_from(["a", "b", " ", "ab", "你", "😀", "\n"])
    ids = tok.encode("".join(draw(st.lists(words, min_size=1, max_size=30))), add_special_tokens=False)
    updates, answer, taken = [], [], 0
    while taken < len(ids):
        if answer and draw(st.integers(0, 6)) == 0:
            start = draw(st.integers(0, len(answer) - 1))
            tokens = draw(st.lists(st.sampled_from(ids), min_size=1, max_size=3))
        else:
            start, tokens = len(answer), ids[taken : taken + draw(st.integers(1, 3))]
            taken += len(tokens)
        updates.append((start, tokens))
        answer = answer[:start] + tokens
    text = tok.decode(answer)
    inside = (
        st.integers(0, max(len(text) - 1, 0))
        .flatmap(lambda i: st.integers(i + 1, i + 4).map(lambda j: text[i:j]))
        .filter(bool)
    )
    stops = draw(st.lists(inside | st.text("ab 你😀\ufffd", min_size=1, max_size=3), max_size=3))
    return updates, tuple(stops), draw(st.booleans()), draw(st.booleans())


@pytest.fixture(scope="module")
def tokenizers(tiny_generator):
    return {
        "byte-level BPE": tiny_generator[1],
        "sentencepiece": sentencepiece_tokenizer("strip first space"),
    }


@pytest.mark.parametrize("kind", ["byte-level BPE", "sentencepiece"])
@run_with(max_examples=100, deadline=None)
@given(data=st.data())
def test_a_tracker_streams_what_the_whole_text_says(tokenizers, kind, data):
    """The tracker reads each update's new text only; what it sends is what reading the whole text
    at every update gives (where the first stop string starts, the tokens and text released)."""
    from lenvm.serve.runner import _Tracker, first_stop

    class WholeText(_Tracker):
        def _stop_from(self, start):
            return first_stop("".join(self.decoder.pieces), self.choice.stops)

        def _progress(self, pieces, released):
            ends = list(itertools.accumulate(len(p) for p in pieces))
            upto = max(
                (k for k, (p, e) in enumerate(zip(pieces, ends, strict=True), 1) if p and e <= released),
                default=0,
            )
            if upto <= self.sent_tokens:
                return None
            sent, self.sent_tokens = self.sent_tokens, upto
            text = "".join(pieces[:upto])
            return self._chunk(pieces, text[self.sent_chars :], len(text), sent, None)

    tok = tokenizers[kind]
    updates, stops, include, ends = data.draw(updates_of_answers(tok))
    choice = Choice(Request([1], SamplingParams(max_new_tokens=999)), stops, include)
    eos = tok.eos_token_id if ends else None
    assert tracked(_Tracker(0, choice, tok), updates, eos) == tracked(WholeText(0, choice, tok), updates, eos)


def test_openai_fields_that_ask_for_nothing_different_are_taken(url):
    """What SDKs and frameworks send by default, or only to inform, is taken; the values of those
    fields that ask for what this server does not do are refused, naming the field."""
    taken = {
        "response_format": {"type": "text"},
        "store": False,
        "metadata": {"team": "a"},
        "service_tier": "auto",
        "safety_identifier": "u1",
        "prompt_cache_key": "k",
        "parallel_tool_calls": False,
        "modalities": ["text"],
        "tools": [],
        "tool_choice": "none",
        "user": "u1",
        "skip_special_tokens": True,
        "include_stop_str_in_output": False,
    }
    body = {"model": MODEL, "messages": HI, "max_tokens": 2, **taken}
    answer = httpx.post(url + "/v1/chat/completions", json=body, timeout=30)
    assert answer.status_code == 200, answer.text
    for field, value in [
        ("response_format", {"type": "json_object"}),
        ("response_format", {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}),
        ("modalities", ["text", "audio"]),
        ("tools", [{"type": "function", "function": {"name": "f"}}]),
        ("tool_choice", "required"),
        ("tool_choice", {"type": "function", "function": {"name": "f"}}),
        ("skip_special_tokens", False),
    ]:
        refused = httpx.post(url + "/v1/chat/completions", json={**body, field: value}, timeout=30)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == field, (field, refused.text)
        assert "not supported" in refused.json()["error"]["message"]
    # the two shared with text completions
    plain = {"model": MODEL, "prompt": "Hi", "max_tokens": 2}
    ok = {"response_format": {"type": "text"}, "skip_special_tokens": True}
    assert httpx.post(url + "/v1/completions", json={**plain, **ok}, timeout=30).status_code == 200


def test_chat_template_arguments_reach_the_template_as_in_vllm(url, tiny_generator):
    """The tiny template writes an empty thinking block when enable_thinking is false, as Qwen3's."""
    tok = tiny_generator[1]

    def prompt_tokens(**fields):
        body = {"model": MODEL, "messages": HI, "max_tokens": 1, **fields}
        answer = httpx.post(url + "/v1/chat/completions", json=body, timeout=30)
        assert answer.status_code == 200, answer.text
        return answer.json()["usage"]["prompt_tokens"]

    off = Prompt("0", messages=HI, chat_template_kwargs={"enable_thinking": False})
    assert prompt_tokens(chat_template_kwargs={"enable_thinking": False}) == len(encode_prompt(tok, off))
    assert len(encode_prompt(tok, off)) > len(encode_prompt(tok, HI))
    assert prompt_tokens(chat_template_kwargs={"today": "Monday"}) == len(encode_prompt(tok, HI))  # unread
    # reasoning_effort is the template variable of that name, and turns thinking off with "none"
    assert prompt_tokens(reasoning_effort="none") == len(encode_prompt(tok, off))
    assert prompt_tokens(reasoning_effort="low") == len(encode_prompt(tok, HI))
    # the turn: no generation prompt, or the last (assistant) message left open
    assert prompt_tokens(add_generation_prompt=False) == len(
        encode_prompt(tok, HI, add_generation_prompt=False)
    )
    started = [*HI, {"role": "assistant", "content": "The sea"}]
    expected = encode_prompt(tok, started, add_generation_prompt=False, continue_final_message=True)
    assert tok.decode(expected).endswith("assistant\nThe sea")
    assert prompt_tokens(messages=started, add_generation_prompt=False, continue_final_message=True) == len(
        expected
    )
    # on the length endpoints where they take messages, too
    predicted = httpx.post(
        url + "/v1/length/predict", json={"messages": HI, "chat_template_kwargs": {"enable_thinking": False}}
    ).json()
    assert predicted["data"][0]["prompt_tokens"] == len(encode_prompt(tok, off))
    kwargs, effort, chat, text = "chat_template_kwargs", "reasoning_effort", HI, {"prompt": "Hi"}
    efforts = "should be 'none', 'minimal', 'low', 'medium', 'high', 'xhigh' or 'max'"  # vLLM's
    for route, fields, field, message in [
        ("chat/completions", {kwargs: [1]}, kwargs, "should be an object"),
        ("chat/completions", {kwargs: {"tokenize": True}}, kwargs, "cannot set 'tokenize'"),
        ("chat/completions", {effort: 1}, effort, efforts),
        ("chat/completions", {effort: "extreme"}, effort, efforts),
        ("chat/completions", {effort: ""}, effort, efforts),
        ("chat/completions", {effort: "low", kwargs: {effort: "high"}}, effort, "both as a field and in"),
        (
            "chat/completions",
            {"continue_final_message": True},
            "continue_final_message",
            "add_generation_prompt",
        ),
        ("length/predict", {"messages": chat, kwargs: "x"}, kwargs, "should be an object"),
        ("length/predict", {**text, effort: "low"}, effort, "goes with messages"),
        ("length/predict", {**text, effort: "none"}, effort, "goes with messages"),
        ("length/values", {**text, "completion": "x", effort: "none"}, effort, "goes with messages"),
        ("length/values", {**text, "completion": "x", kwargs: {"a": 1}}, kwargs, "goes with messages"),
    ]:
        body = {
            "model": MODEL,
            **({"messages": chat, "max_tokens": 1} if route == "chat/completions" else {}),
        }
        refused = httpx.post(url + f"/v1/{route}", json={**body, **fields}, timeout=30)
        assert refused.status_code == 400, (fields, refused.text)
        error = refused.json()["error"]
        assert error["param"] == field and message in error["message"], (fields, error)


def test_server_wide_template_arguments_go_under_each_requests_own_as_in_vllm(engine, tiny_generator):
    """vLLM's --default-chat-template-kwargs: merged under a request's chat_template_kwargs and
    under what its reasoning_effort sets, wherever the chat template is applied."""
    tok = tiny_generator[1]
    off = len(encode_prompt(tok, Prompt("0", messages=HI, chat_template_kwargs={"enable_thinking": False})))
    on = len(encode_prompt(tok, HI))
    assert off > on  # the tiny template's empty think block
    defaults = {"enable_thinking": False, "reasoning_effort": "low", "today": "Monday"}
    with running(engine, default_chat_template_kwargs=defaults) as (url, app):

        def post(route, **fields):
            answer = httpx.post(url + f"/v1/{route}", json={"model": MODEL, **fields}, timeout=30)
            assert answer.status_code == 200, (route, fields, answer.text)
            return answer.json()

        def chat_prompt_tokens(**fields):
            return post("chat/completions", messages=HI, max_tokens=1, **fields)["usage"]["prompt_tokens"]

        def predicted_prompt_tokens(**fields):
            return post("length/predict", **fields)["data"][0]["prompt_tokens"]

        def values(**fields):
            return [
                t["value_before"] for t in post("length/values", completion="The sea.", **fields)["tokens"]
            ]

        kwargs = "chat_template_kwargs"
        # The defaults apply (a default reasoning_effort is a variable like any: it sets nothing else).
        assert chat_prompt_tokens() == off
        assert chat_prompt_tokens(**{kwargs: {"enable_thinking": True}}) == on  # the request's own wins
        assert chat_prompt_tokens(**{kwargs: {"today": "Tuesday"}}) == off  # key by key, not the whole object
        assert chat_prompt_tokens(**{kwargs: {"enable_thinking": None}}) == off  # null: the default (vLLM's)
        assert chat_prompt_tokens(**{kwargs: {"enable_thinking": "auto"}}) == off  # "auto" likewise
        # An effort sets enable_thinking at the request's level, above the server's default...
        assert chat_prompt_tokens(reasoning_effort="low") == on
        assert chat_prompt_tokens(reasoning_effort="none") == off
        # ...and the request's own kwargs above its effort, as without defaults.
        assert chat_prompt_tokens(reasoning_effort="low", **{kwargs: {"enable_thinking": False}}) == off
        # A request's effort goes over the default one: not refused as an effort given twice.
        assert chat_prompt_tokens(**{kwargs: {}}, reasoning_effort="high") == on
        # The length endpoints' messages alike.
        assert predicted_prompt_tokens(messages=HI) == off
        assert predicted_prompt_tokens(messages=[HI, HI], **{kwargs: {"enable_thinking": True}}) == on
        assert predicted_prompt_tokens(messages=HI, reasoning_effort="medium") == on
        assert values(messages=HI) == values(messages=HI, **{kwargs: {"enable_thinking": False}})
        assert values(messages=HI) != values(messages=HI, **{kwargs: {"enable_thinking": True}})
        # A text prompt has no template: the defaults neither change it nor get it refused.
        assert predicted_prompt_tokens(prompt="Hi") == len(tok("Hi")["input_ids"])
        assert values(prompt="Hi") == values(prompt=tok("Hi")["input_ids"])
        completion = client(url).completions.create(model=MODEL, prompt="Hi", max_tokens=1)
        assert completion.usage.prompt_tokens == len(tok("Hi")["input_ids"])
        refused = httpx.post(url + "/v1/length/predict", json={"prompt": "Hi", kwargs: {"a": 1}}, timeout=30)
        assert (
            refused.status_code == 400 and "goes with messages" in refused.text
        )  # a request's own, as before
        assert app.state.lenvm.settings.default_chat_template_kwargs == defaults


@pytest.mark.parametrize(
    ("defaults", "message"),
    [
        ({"tokenize": True}, "cannot set 'tokenize'"),
        ({"add_generation_prompt": False}, "cannot set 'add_generation_prompt'"),
        ([1], "must be an object of template variables, got list"),
        ({1: True}, "must name its variables by strings"),
        ({"x": float("nan")}, "must hold JSON values"),
    ],
)
def test_bad_server_wide_template_arguments_are_refused_at_construction(defaults, message):
    from lenvm.io import InputError

    with pytest.raises(InputError, match=f"^default_chat_template_kwargs: .*{message}"):
        ServerSettings(served_model_name=MODEL, default_chat_template_kwargs=defaults)


def test_template_arguments_merge_as_vllm_merges_them():
    """vLLM drops a request's null and "auto" arguments where the server has defaults (a variable
    the request leaves to the server, whether or not it has a default) and takes a request's
    arguments as they are where it has none."""
    defaults = {"enable_thinking": False}
    given = {"enable_thinking": "auto", "mode": None, "effort": "auto", "today": "Monday"}
    assert merged_template_kwargs(defaults, given) == {"enable_thinking": False, "today": "Monday"}
    assert merged_template_kwargs({}, given) == given
    assert merged_template_kwargs(defaults, None) == defaults
    assert (
        ServerSettings(
            served_model_name=MODEL, default_chat_template_kwargs=None
        ).default_chat_template_kwargs
        == {}
    )


def test_server_wide_template_arguments_need_a_chat_template(tiny_generator):
    from lenvm.io import InputError

    model, tok = tiny_generator
    untemplated = copy.copy(tok)
    untemplated.chat_template = None
    settings = ServerSettings(
        served_model_name=MODEL, default_chat_template_kwargs={"enable_thinking": False}
    )
    with pytest.raises(InputError, match="no chat template to pass them to"):
        create_app(Engine(model, untemplated), settings)
    create_app(Engine(model, untemplated), ServerSettings(served_model_name=MODEL))  # none given: served


def test_continuous_usage_stats_give_the_usage_so_far_in_every_chunk(url):
    events = []
    body = {
        "model": MODEL,
        "messages": HI,
        "max_tokens": 5,
        "seed": 2,
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                events.append(json.loads(line[len("data: ") :]))
    *chunks, last = events
    assert last["choices"] == [] and all("usage" in e for e in events)
    so_far = [e["usage"]["completion_tokens"] for e in chunks]
    assert (
        so_far[0] == 0 and so_far == sorted(so_far) and so_far[-1] == last["usage"]["completion_tokens"] == 5
    )
    assert all(e["usage"]["prompt_tokens"] == last["usage"]["prompt_tokens"] for e in chunks)


def test_server_bounds_must_be_positive_integers():
    from lenvm.io import InputError

    settings = ServerSettings(served_model_name=MODEL, batch_size=np.int64(4))
    assert settings.batch_size == 4 and type(settings.batch_size) is int
    for bad in ({"batch_size": 0}, {"batch_size": 1.5}, {"max_streams": True}, {"max_body_bytes": -1}):
        with pytest.raises(InputError, match=f"^{next(iter(bad))} must be a positive integer"):
            ServerSettings(served_model_name=MODEL, **bad)
    for bad in ({"max_waiting": -1}, {"shutdown_timeout": -1.0}, {"shutdown_timeout": float("nan")}):
        with pytest.raises(InputError, match="must not be negative"):
            ServerSettings(served_model_name=MODEL, **bad)
    for timeout in (0.0, -1.0, float("nan")):
        with pytest.raises(InputError, match="stream_stall_timeout must be a positive number"):
            ServerSettings(served_model_name=MODEL, stream_stall_timeout=timeout)


def test_extreme_sampling_settings_are_served(url):
    c = client(url)
    for settings in ({"top_k": 10**6}, {"temperature": 1e-30}, {"top_p": 1e-30}, {"min_p": 0.999999}):
        answer = c.completions.create(
            model=MODEL, prompt="Hi", max_tokens=3, extra_body={**settings, "length_tilt": 1e30}
        )
        assert answer.usage.completion_tokens >= 1


def test_n_choices_have_their_own_seeds(url):
    c = client(url)
    answer = c.completions.create(model=MODEL, prompt="Hi", max_tokens=8, seed=3, n=3)
    assert [ch.index for ch in answer.choices] == [0, 1, 2]
    texts = [ch.text for ch in answer.choices]
    assert len(set(texts)) == 3
    assert texts[0] == c.completions.create(model=MODEL, prompt="Hi", max_tokens=8, seed=3).choices[0].text
    assert answer.usage.completion_tokens == 24
    streamed = list(c.completions.create(model=MODEL, prompt="Hi", max_tokens=8, seed=3, n=3, stream=True))
    for index, text in enumerate(texts):
        assert "".join(ch.choices[0].text for ch in streamed if ch.choices[0].index == index) == text


def test_rollouts_through_the_server_match_local_rollouts(url, tiny_path, tiny_generator, tmp_path):
    """lenvm's own OpenAI rollout backend (vLLM's fields: token ids as logprobs, top_k -1, min_p,
    add_special_tokens) gets from the server what the local backend samples."""
    from lenvm.rollouts import read_rollouts, rollout

    prompts = ["Tell me about the sea.", "Hi"]
    sampling = SamplingParams(temperature=0.8, top_p=0.9, max_new_tokens=10, seed=5)
    common = dict(n=1, sampling=sampling, progress=False)
    rollout(tiny_generator, prompts, tmp_path / "local.jsonl", **common)
    rollout(
        tiny_path,
        prompts,
        tmp_path / "served.jsonl",
        backend="openai",
        base_url=url + "/v1",
        api_model=MODEL,
        **common,
    )
    local, served = (
        sorted(read_rollouts(tmp_path / name), key=lambda r: r["prompt_id"])
        for name in ("local.jsonl", "served.jsonl")
    )
    assert [r["completion_token_ids"] for r in served] == [r["completion_token_ids"] for r in local]
    assert [r["prompt_token_ids"] for r in served] == [r["prompt_token_ids"] for r in local]
    assert "token_ids_source" not in served[0]  # the ids came from the server, not re-tokenized


# -- the length endpoints ------------------------------------------------------------------------


def test_predict_gives_the_value_at_the_prompt_boundary(url, lenvm, tiny_generator):
    tok = tiny_generator[1]
    answer = httpx.post(
        url + "/v1/length/predict", json={"model": MODEL, "prompt": ["Hi", "Tell me more"]}
    ).json()
    raw = [tok(p)["input_ids"] for p in ("Hi", "Tell me more")]
    expected = lenvm.predict_values(raw)
    assert [d["value"] for d in answer["data"]] == pytest.approx(expected, abs=1e-5)
    assert [d["predicted_tokens"] for d in answer["data"]] == pytest.approx(
        lenvm.lengths_from_values(expected),
        rel=1e-4,  # the library's lengths: at least 1 token
    )
    assert [d["prompt_tokens"] for d in answer["data"]] == [len(r) for r in raw]
    chat = httpx.post(url + "/v1/length/predict", json={"messages": [HI, HI]}).json()
    assert len(chat["data"]) == 2
    assert chat["data"][0]["value"] == pytest.approx(lenvm.predict_values([HI])[0], abs=1e-5)


def test_predict_cuts_a_long_list_into_bounded_forwards(url, lenvm, tiny_generator, monkeypatch):
    """Prompts are predicted a bounded forward at a time (decoding steps run in between), and the
    answers come back in the order asked."""
    import lenvm.serve.app as app_module

    monkeypatch.setattr(app_module, "PREDICT_CHUNK_TOKENS", 16)
    calls = []
    original = lenvm.predict_values
    monkeypatch.setattr(lenvm, "predict_values", lambda prompts: calls.append(prompts) or original(prompts))
    prompts = [[7] * n for n in (9, 3, 12, 1, 5, 20)]
    answer = httpx.post(url + "/v1/length/predict", json={"prompt": prompts}).json()
    assert [d["prompt_tokens"] for d in answer["data"]] == [len(p) for p in prompts]
    assert [d["value"] for d in answer["data"]] == pytest.approx(original(prompts), abs=1e-5)
    assert len(calls) > 1 and all(len(c) * max(map(len, c)) <= 16 or len(c) == 1 for c in calls)

    # A client that gives up stops the forwards not yet run.
    calls.clear()
    slow = lambda prompts: time.sleep(0.4) or calls.append(prompts) or original(prompts)  # noqa: E731
    monkeypatch.setattr(lenvm, "predict_values", slow)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/length/predict", json={"prompt": prompts * 3}, timeout=0.6)
    time.sleep(2.0)
    assert 1 <= len(calls) < 6


@pytest.mark.parametrize(("timeout", "status", "outcome"), [(30.0, 200, "ok"), (0.05, 503, "aborted")])
def test_a_shutdown_lets_a_predict_in_flight_finish_within_its_timeout(
    engine, lenvm, monkeypatch, timeout, status, outcome
):
    """A predict taken before SIGTERM goes on through its forwards until the shutdown timeout (then
    it is cut, as a generation is); one that arrives after is refused."""
    import lenvm.serve.app as app_module

    monkeypatch.setattr(app_module, "PREDICT_CHUNK_TOKENS", 4)  # the two prompts: two forwards
    started, go = threading.Event(), threading.Event()
    original = lenvm.predict_values

    def gated(prompts):
        started.set()
        go.wait(10)
        return original(prompts)

    monkeypatch.setattr(lenvm, "predict_values", gated)
    prompts = [[7, 8, 9], [9, 8, 7]]
    with running(engine, shutdown_timeout=timeout) as (url, app):
        answers = []
        sender = threading.Thread(
            target=lambda: answers.append(httpx.post(url + "/v1/length/predict", json={"prompt": prompts}))
        )
        sender.start()
        assert started.wait(10)
        app.state.lenvm.begin_shutdown()  # what SIGTERM does
        time.sleep(0.2)  # past the short timeout
        go.set()
        sender.join(10)
        assert answers[0].status_code == status, answers[0].text
        if status == 200:
            assert [d["value"] for d in answers[0].json()["data"]] == pytest.approx(
                original(prompts), abs=1e-5
            )
        assert httpx.post(url + "/v1/length/predict", json={"prompt": prompts}).status_code == 503
        counted = app.state.metrics.registry.get_sample_value
        assert counted("lenvm_requests_total", {"endpoint": "length_predict", "outcome": outcome}) == 1
        assert counted("lenvm_requests_total", {"endpoint": "length_predict", "outcome": "rejected"}) == 1


@given(st.lists(st.integers(1, 50), min_size=1, max_size=30), st.integers(1, 100))
def test_forward_chunks_cover_every_sequence_once_within_the_budget(lengths, budget):
    from lenvm.serve.app import _forward_chunks

    chunks = _forward_chunks(lengths, budget)
    assert sorted(i for c in chunks for i in c) == list(range(len(lengths)))
    for chunk in chunks:
        assert len(chunk) == 1 or len(chunk) * max(lengths[i] for i in chunk) <= budget


def test_values_endpoint_gives_the_curve_and_td_residuals(url, lenvm):
    answer = httpx.post(
        url + "/v1/length/values", json={"messages": HI, "completion": "The sea is blue."}
    ).json()
    expected = token_values(lenvm, HI, "The sea is blue.")
    assert [t["value_before"] for t in answer["tokens"]] == pytest.approx(
        [t.value_before for t in expected.tokens], abs=1e-5
    )
    assert [t["residual"] for t in answer["tokens"]] == pytest.approx(
        [t.residual for t in expected.tokens], abs=1e-5
    )
    assert answer["gamma"] == lenvm.gamma and answer["summary"]["true_length"] == expected.num_tokens
    # An answer that filled the context is valued as the engine wrote it (its ids fit exactly).
    for finished, completion, status in ((False, 24, 200), (True, 24, 200), (True, 25, 400)):
        body = {"prompt": [100] * 1000, "completion": [101] * completion, "finished": finished}
        response = httpx.post(url + "/v1/length/values", json=body)
        assert response.status_code == status, (finished, completion, response.text)
    # A finished empty answer (only its EOS), as the library and lenvm values take it.
    for empty in ("", []):
        answer = httpx.post(url + "/v1/length/values", json={"messages": HI, "completion": empty}).json()
        assert [t["token_id"] for t in answer["tokens"]] == [
            t.token_id for t in token_values(lenvm, HI, "").tokens
        ]


def test_models_health_and_metrics(url):
    models = client(url).models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].max_model_len == 1024 and models.data[0].lenvm["kind"] == "attached"
    assert client(url).models.retrieve(MODEL).model_dump() == models.data[0].model_dump()
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client(url).models.retrieve("another-model")
    assert httpx.get(url + "/health").json()["status"] == "ok"
    text = httpx.get(url + "/metrics").text
    for name in (
        "lenvm_requests_total",
        "lenvm_generated_tokens_total",
        "lenvm_queue_depth",
        "lenvm_step_seconds_bucket",
        "lenvm_time_to_first_token_seconds_bucket",
    ):
        assert name in text


# -- bad input and limits ----------------------------------------------------------------------------


BAD = [
    (b"{bad json", 400, "malformed JSON"),
    (b"[1, 2]", 400, "JSON object"),
    ({"model": MODEL, "prompt": "Hi", "frobnicate": 1}, 400, "unknown field 'frobnicate'"),
    ({"model": MODEL, "prompt": "Hi", "temperature": "hot"}, 400, "temperature"),
    ({"model": MODEL, "prompt": "Hi", "max_tokens": True}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "Hi", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "Hi", "n": 0}, 400, "n must be"),
    ({"model": MODEL, "prompt": "Hi", "n": 10**9}, 400, "exceed"),
    ({"model": MODEL, "prompt": "Hi", "temperature": -1}, 400, "temperature"),
    ({"model": MODEL, "prompt": "Hi", "seed": -(2**63) - 1}, 400, "seed"),
    (
        {"model": MODEL, "prompt": "Hi", "seed": 2**64 + 1},
        400,
        "seed: Input should be less than or equal to 9223",
    ),
    ({"model": MODEL, "prompt": "Hi", "length_best_of": 10**5, "length_equal_to": 3}, 400, "from 1 to 16"),
    (
        {"model": MODEL, "prompt": "Hi", "length_at_least": 1022},
        400,
        "within the context left after the prompt (1022)",
    ),
    ({"model": MODEL, "prompt": ""}, 400, "the prompt encodes to no tokens"),
    ({"model": MODEL, "prompt": "Hi", "foo": 1}, 400, "unknown field 'foo'"),
    ({"model": MODEL, "prompt": "Hi", "foo": None}, 400, "unknown field 'foo'"),  # null or not
    ({"model": MODEL, "prompt": [5, 10**9]}, 400, "outside the vocabulary"),
    ({"model": MODEL}, 400, "missing field 'prompt'"),
    ({"model": MODEL, "prompt": ["Hi", 5]}, 400, "prompt: expected one of str, list[str], list[int]"),
    ({"model": "gpt-4", "prompt": "Hi"}, 404, "does not exist"),
    ({"model": MODEL, "prompt": "Hi", "length_equal_to": 5, "length_at_most": 9}, 400, "one length control"),
    (
        {"model": MODEL, "prompt": "Hi", "vllm_xargs": {"length_equal_to": 5, "length_tilt": 1.0}},
        400,
        "one length",
    ),
    (
        {"model": MODEL, "prompt": "Hi", "length_equal_to": 5, "vllm_xargs": {"length_equal_to": 5}},
        400,
        "both",
    ),
    ({"model": MODEL, "prompt": "Hi", "vllm_xargs": {"length_equal_to": -5}}, 400, "at least 1"),
    ({"model": MODEL, "prompt": "Hi", "vllm_xargs": {"length_equal_to": "5"}}, 400, "integer"),
    ({"model": MODEL, "prompt": "Hi", "vllm_xargs": {"length_equal_to": 10**12}}, 400, "can never be met"),
    ({"model": MODEL, "prompt": "Hi", "max_tokens": 5000, "length_equal_to": 5000}, 400, "context"),
    ({"model": MODEL, "prompt": "Hi", "max_tokens": 10, "length_equal_to": 10}, 400, "never be met"),
    ({"model": MODEL, "prompt": "Hi", "max_tokens": 10, "length_at_least": 10}, 400, "never be met"),
    ({"model": MODEL, "prompt": "Hi", "vllm_xargs": {"length_lenght": 5}}, 400, "unknown length control key"),
    ({"model": MODEL, "prompt": "Hi", "vllm_xargs": {"temperature": 0.5}}, 400, "unknown vllm_xargs key"),
    ({"model": MODEL, "prompt": "Hi", "length_rule": "ours"}, 400, "needs a length control"),
    ({"model": MODEL, "prompt": "Hi", "max_tokens": 2000}, 400, "context"),
    ({"model": MODEL, "prompt": "Hi " * 1200}, 400, "context"),
    ({"model": MODEL, "prompt": "Hi", "presence_penalty": 0.5}, 400, "penalties"),
    ({"model": MODEL, "prompt": "Hi", "echo": True}, 400, "echo"),
    ({"model": MODEL, "prompt": "Hi", "logprobs": 50}, 400, "logprobs"),
    ({"model": MODEL, "prompt": "Hi", "stop": [""]}, 400, "stop"),
    ({"model": MODEL, "prompt": "Hi", "stop": [str(i) for i in range(17)]}, 400, "at most 16 stop strings"),
    ({"model": MODEL, "prompt": "Hi", "stream_options": {"include_usage": True}}, 400, "stream"),
]


@pytest.mark.parametrize(("body", "status", "message"), BAD)
def test_bad_completion_requests_get_a_4xx_and_leave_the_server_healthy(url, body, status, message):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(
        url + "/v1/completions", content=content, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert message in error["message"] and error["code"] == status and error["type"]
    assert not error["message"].startswith("request ")  # no engine-internal request key


@pytest.mark.parametrize(
    ("schema", "body", "message", "param"),
    [
        # A client's key that reads as a type name is named as it was sent.
        (CompletionRequest, {"prompt": "Hi", "foo[bar]": 1}, "unknown field 'foo[bar]'", "foo[bar]"),
        (CompletionRequest, {"prompt": "Hi", "str": 1}, "unknown field 'str'", "str"),
        (CompletionRequest, {"prompt": "Hi", "none": None}, "unknown field 'none'", "none"),
        (
            PredictRequest,
            {"messages": [{"role": "user", "content": "Hi", "int": 1}]},
            "unknown field 'messages.0.int'",
            "messages",
        ),
        (
            CompletionRequest,
            {"prompt": "Hi", "vllm_xargs": {"[x]": [1]}},
            "vllm_xargs.[x]: expected one of str, int, float, bool",
            "vllm_xargs",
        ),
        (
            ChatCompletionRequest,
            {"messages": HI, "metadata": {"str": 1}},
            "metadata.str: Input should be a valid string",
            "metadata",
        ),
        # A union's members, where a value fits none, are named whatever the depth.
        (
            CompletionRequest,
            {"prompt": 5},
            "prompt: expected one of str, list[str], list[int], list[list[int]]",
            "prompt",
        ),
        (
            ChatCompletionRequest,
            {"messages": [{"role": "user", "content": 5}]},
            "messages.0.content: expected one of str, list[TextPart]",
            "messages",
        ),
    ],
)
def test_a_bad_field_is_named_as_it_was_sent(schema, body, message, param):
    with pytest.raises(ApiError) as refused:
        parse(schema, json.dumps(body).encode())
    assert refused.value.message == message and refused.value.param == param


@pytest.mark.parametrize("blank", ["   ", "\n\n", " \t\n"])
def test_whitespace_is_a_prompt_like_any_other_text(url, tiny_generator, blank):
    """As in OpenAI's API: any text is a completions prompt, and a message's content may be
    whitespace or empty; every endpoint takes what the others take."""
    tok = tiny_generator[1]
    raw, chat = tok(blank)["input_ids"], [{"role": "user", "content": blank}]
    templated = len(encode_prompt(tok, Prompt("0", messages=chat)))  # lenvm's prompt records refuse it
    text = client(url).completions.create(model=MODEL, prompt=blank, max_tokens=2)
    assert text.usage.prompt_tokens == len(raw) > 0
    for messages, tokens in [
        (chat, templated),
        ([{"role": "user", "content": [{"type": "text", "text": blank}]}], templated),
        (
            [{"role": "user", "content": ""}],
            len(encode_prompt(tok, Prompt("0", messages=[{"role": "user", "content": ""}]))),
        ),
    ]:
        answer = client(url).chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
        assert answer.usage.prompt_tokens == tokens
    for route, body, tokens in [
        ("predict", {"prompt": blank}, len(raw)),
        ("predict", {"messages": chat}, templated),
        ("values", {"prompt": blank, "completion": "Hi"}, len(raw)),
        ("values", {"messages": chat, "completion": "Hi"}, templated),
    ]:
        response = httpx.post(f"{url}/v1/length/{route}", json=body)
        assert response.status_code == 200, (route, body, response.text)
        answer = response.json()
        assert (answer["data"][0] if route == "predict" else answer)["prompt_tokens"] == tokens
    # Only a prompt that comes to no tokens is refused, on every endpoint alike.
    for route, body in [
        ("completions", {"model": MODEL, "prompt": ""}),
        ("completions", {"model": MODEL, "prompt": ["Hi", ""]}),
        ("length/predict", {"prompt": ""}),
        ("length/values", {"prompt": "", "completion": "Hi"}),
    ]:
        response = httpx.post(f"{url}/v1/{route}", json=body)
        assert response.status_code == 400 and response.json()["error"] == {
            "message": "the prompt encodes to no tokens",
            "type": "invalid_request_error",
            "param": "prompt",
            "code": 400,
        }, (route, body)


def test_token_ids_outside_the_vocabulary_get_the_engines_message(url, engine):
    from lenvm.decoding.params import RequestError

    with pytest.raises(RequestError) as caught:
        engine.generate([Request([5, 10**9])])
    response = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": [5, 10**9]})
    assert response.status_code == 400
    assert response.json()["error"]["message"] == caught.value.reason
    assert caught.value.reason.startswith("the prompt holds token id 1000000000, outside the vocabulary")


def test_sampling_settings_at_their_limits_fail_no_request_beside_them(server):
    """A top_p that float32 rounds to 0 decodes (its likeliest token alone), a temperature beyond
    float32 is refused naming its bound: neither fails the request decoding in the same batch."""
    url, app = server
    long = {"model": MODEL, "prompt": "Hi", "max_tokens": 900, "extra_body": {"ignore_eos": True}}
    stream = iter(client(url).completions.create(**long, stream=True))
    next(stream)
    assert app.state.lenvm.runner.scheduler.running == 1  # what the next requests join

    def completion(**sampling):
        body = {"model": MODEL, "prompt": "Hi", "max_tokens": 4, "ignore_eos": True, **sampling}
        return httpx.post(url + "/v1/completions", json=body, timeout=60)

    nucleus = completion(top_p=1e-46)
    assert nucleus.status_code == 200, nucleus.text
    assert nucleus.json()["choices"][0]["text"] == completion(temperature=0).json()["choices"][0]["text"]
    hot = completion(temperature=1e39)
    assert hot.status_code == 400
    assert "temperature must be a number in [0, 1e+06]" in hot.json()["error"]["message"]
    *_, last = stream
    assert last.choices[0].finish_reason == "length"


@pytest.fixture(scope="module")
def padded_engine(tiny_path, tmp_path_factory):
    """An engine on the tiny model whose embedding has 8 rows past the tokenizer's ids, as models
    pad their embeddings to a round size."""
    from lenvm.hub import load_generator

    model, tok = load_generator(tiny_path)
    model.resize_token_embeddings(len(tok) + 8, mean_resizing=False)
    padded = tmp_path_factory.mktemp("padded")  # another model now: a LenVM records it by its folder
    model.save_pretrained(padded)
    tok.save_pretrained(padded)
    model, tok = load_generator(padded)
    lenvm = LengthValueModel.from_base(padded, kind="attached", generator=(model, tok))
    return Engine(model, tok, lenvm=lenvm, num_candidates=4)


def test_token_ids_of_the_embeddings_padding_rows_are_taken_as_the_engine_takes_them(padded_engine):
    from lenvm.decoding.params import RequestError

    engine = padded_engine
    rows = engine.model.get_input_embeddings().weight.shape[0]
    assert rows == len(engine.tokenizer) + 8
    padding = [5, rows - 1]  # past the tokenizer's ids, within the model's
    expected = alone(engine, padding, max_new_tokens=3, seed=1)
    with pytest.raises(RequestError) as caught:
        engine.generate([Request([5, rows])])
    with running(engine) as (url, _):

        def post(route, body):
            return httpx.post(f"{url}/v1/{route}", json={"model": MODEL, **body}, timeout=60)

        answer = post("completions", {"prompt": padding, "max_tokens": 3, "seed": 1})
        assert answer.status_code == 200 and answer.json()["choices"][0]["text"] == expected.text
        assert post("length/predict", {"prompt": padding}).status_code == 200
        assert post("length/values", {"prompt": padding, "completion": [rows - 1]}).status_code == 200
        refused = post("completions", {"prompt": [5, rows]})
        assert refused.status_code == 400 and refused.json()["error"]["message"] == caught.value.reason
        assert caught.value.reason.endswith(f"outside the vocabulary (0-{rows - 1})")


BAD_CHAT = [
    ({"model": MODEL, "messages": "Hi"}, "messages"),
    ({"model": MODEL, "messages": []}, "messages"),
    ({"model": MODEL, "messages": [{"role": "user"}]}, "a user message needs its content"),
    (
        {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        "content parts of type image_url are not supported",
    ),
    ({"model": MODEL, "messages": [{"role": "user", "content": [{"text": "Hi"}]}]}, "needs a 'type'"),
    ({"model": MODEL, "messages": HI, "top_logprobs": 2}, "top_logprobs"),
    ({"model": MODEL, "messages": HI, "max_tokens": 5, "max_completion_tokens": 5}, "not both"),
    ({"model": MODEL, "messages": HI, "tools": [{"type": "function"}]}, "tools are not supported"),
    ({"model": MODEL, "messages": HI, "functions": None}, "unknown field 'functions'"),
    (
        {"model": MODEL, "messages": [{"role": "user", "content": "Hi", "foo": None}]},
        "unknown field 'messages.0.foo'",
    ),
    (
        {"model": MODEL, "messages": [{"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}]},
        "tool calls are not supported",
    ),
]


def test_a_bad_length_key_is_named_where_it_was_sent(url):
    for body, param in [
        ({"length_equal_to": -3}, "length_equal_to"),
        ({"vllm_xargs": {"length_equal_to": -3}}, "vllm_xargs"),
        ({"length_equal_to": 5, "length_rule": "magic"}, "length_rule"),
        ({"length_at_most": 5, "length_best_of": 2}, "length_best_of"),
        ({"length_equal_to": 5, "vllm_xargs": {"length_retries": 99}}, "vllm_xargs"),
    ]:
        response = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "Hi", **body})
        assert response.status_code == 400 and response.json()["error"]["param"] == param


@pytest.mark.parametrize(("body", "message"), BAD_CHAT)
def test_bad_chat_requests_get_a_400(url, body, message):
    response = httpx.post(url + "/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]["message"]


def test_bad_length_endpoint_requests(url):
    for route, body, message in [
        ("predict", {"prompt": "Hi", "messages": HI}, "prompt or messages"),
        ("predict", {}, "prompt or messages"),
        ("predict", {"prompt": []}, "no prompts"),
        ("predict", {"prompt": "Hi " * 1100}, "context"),
        ("values", {"prompt": "Hi"}, "missing field 'completion'"),
        ("values", {"prompt": "Hi", "completion": "", "finished": False}, "empty"),
        ("values", {"prompt": "Hi", "completion": [10**8]}, "outside the vocabulary"),
        # One conversation or a list of them: our own checks are named, not the union's members.
        (
            "predict",
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "type image_url are not",
        ),
        (
            "predict",
            {"messages": [[{"role": "user", "content": [{"type": "image_url"}]}]]},
            "type image_url are not",
        ),
        ("predict", {"messages": 5}, "expected one of list[ChatMessage], list[list[ChatMessage]]"),
        ("predict", {"prompt": "Hi", "foo": None}, "unknown field 'foo'"),
        ("values", {"prompt": "Hi", "completion": "Hi", "foo": None}, "unknown field 'foo'"),
    ]:
        response = httpx.post(f"{url}/v1/length/{route}", json=body)
        assert response.status_code == 400, (route, body, response.text)
        assert message in response.json()["error"]["message"], (route, body)


class _Untouchable:
    """A tokenizer that fails the test if it is called."""

    def __call__(self, *args, **kwargs):
        raise AssertionError("tokenized")


@pytest.mark.parametrize(
    ("extra", "param"), [({"n": 2}, "n"), ({"length_equal_to": 5, "length_best_of": 4}, "length_best_of")]
)
def test_too_many_answers_for_a_list_of_prompts_are_refused_before_tokenizing(extra, param):
    ctx = Context(tokenizer=_Untouchable(), vocab_size=100, context=1024, has_lenvm=True, max_choices=272)
    body = CompletionRequest(prompt=["Hi"] * 200, **extra)
    with pytest.raises(ApiError) as refused:
        plan_completion(body, ctx)
    assert refused.value.param == param and "exceed what this server holds at once (272)" in str(
        refused.value
    )


def test_errors_name_the_field_they_are_about(url):
    for route, body, param in [
        ("completions", {"prompt": "Hi", "seed": 2**63}, "seed"),
        ("completions", {"prompt": "Hi", "seed": -(2**63) - 1}, "seed"),
        ("length/predict", {"messages": []}, "messages"),
        ("length/predict", {"prompt": []}, "prompt"),
        ("length/predict", {"messages": [[{"role": "user", "content": "Hi"}]] * 1025}, "messages"),
        ("length/predict", {"prompt": ["Hi", "Hi " * 1100]}, "prompt"),
        ("length/predict", {"messages": [{"role": "user", "content": "Hi " * 1100}]}, "messages"),
    ]:
        response = httpx.post(f"{url}/v1/{route}", json={"model": MODEL, **body})
        assert response.status_code == 400, (body, response.text)
        error = response.json()["error"]
        assert error["param"] == param, (body, error)
        assert "temperature" not in error["message"], error  # no dump of every sampling setting
    # a seed at either end of the range is one
    for seed in (2**63 - 1, -(2**63)):
        assert client(url).completions.create(model=MODEL, prompt="Hi", max_tokens=1, seed=seed).choices


def test_a_clients_long_values_are_quoted_short_in_errors_and_their_log_lines(url, caplog):
    caplog.set_level(logging.INFO, logger="lenvm.serve")
    long = "模" + "m" * 100_000
    for route, body, param in [
        ("completions", {"model": long, "prompt": "Hi"}, "model"),
        ("completions", {"model": MODEL, "prompt": "Hi", long: 1}, long),  # an unknown field
        ("completions", {"model": MODEL, "prompt": "Hi", "length_equal_to": long}, "length_equal_to"),
        ("completions", {"model": MODEL, "prompt": "Hi", "length_equal_to": 5, "length_rule": long}, None),
        ("completions", {"model": MODEL, "prompt": "Hi", "vllm_xargs": {long: 1}}, "vllm_xargs"),
        ("completions", {"model": MODEL, "prompt": "Hi", "vllm_xargs": {"length_" + long: 1}}, "vllm_xargs"),
        ("completions", {"model": MODEL, "prompt": "Hi", "response_format": {"type": long}}, None),
        ("chat/completions", {"model": MODEL, "messages": [{"role": long}]}, "messages"),
        (
            "chat/completions",
            {"model": MODEL, "messages": [{"role": "user", "content": [{"type": long}]}]},
            None,
        ),
        ("length/predict", {"model": long, "prompt": "Hi"}, "model"),
    ]:
        response = httpx.post(f"{url}/v1/{route}", json=body)
        assert 400 <= response.status_code < 500 and len(response.content) < 600, (route, response.text[:300])
        error = response.json()["error"]
        assert "模mmm" in error["message"] and "m…" in error["message"], error["message"]
        if param is not None:
            assert error["param"] == (param if len(param) < 80 else param[:79] + "…")
    # A content part's type that is no string is named too, not a server error.
    parts = [{"role": "user", "content": [{"type": {"image": 1}}]}]
    response = httpx.post(f"{url}/v1/chat/completions", json={"model": MODEL, "messages": parts})
    assert response.status_code == 400
    assert 'type {"image": 1} are not supported' in response.json()["error"]["message"]
    # Nor does a line break in a role or a type start a line of the server's log.
    for message in [{"role": "x\nINFO: forged"}, {"role": "user", "content": [{"type": "x\nINFO: forged"}]}]:
        response = httpx.post(f"{url}/v1/chat/completions", json={"model": MODEL, "messages": [message]})
        assert response.status_code == 400 and '"x\\nINFO: forged"' in response.json()["error"]["message"]
    response = httpx.get(f"{url}/v1/models/{long[:5000]}")
    assert response.status_code == 404 and len(response.content) < 600

    def lines():  # this test's (a line of an earlier test's request on this server may come late)
        return [
            m
            for m in (r.getMessage() for r in caplog.records if r.name == "lenvm.serve")
            if any(mark in m for mark in ("模", "image", "forged"))
        ]

    wait_until(lambda: len(lines()) >= 14, timeout=5)  # a request's line may follow its answer
    assert len(lines()) == 14 and all(len(line) < 600 for line in lines()), max(map(len, lines()))
    assert not any("\n" in line for line in lines())


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (rb'{"prompt": "\ud800"}', "the body: its text holds U+D800, a lone surrogate and not a character"),
        (rb'{"prompt": "\udfff x"}', "the body: its text holds U+DFFF, a lone surrogate and not a character"),
        (b'{"prompt": "caf\xe9"}', "the body is not UTF-8 text (byte 16)"),
        (b"{bad json", "malformed JSON: key must be a string at line 1 column 2"),
        (b"[" * 5000, "malformed JSON: recursion limit exceeded"),
    ],
)
def test_a_body_that_is_not_json_text_is_refused_in_plain_words(url, body, message):
    response = httpx.post(url + "/v1/completions", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["message"].startswith(message), (
        response.text
    )


def test_a_body_declared_as_other_than_json_gets_a_415(url):
    """A web page can POST text/plain or a form to a server on its visitor's machine without a CORS
    preflight: such a body is refused, as FastAPI refuses it. Undeclared is taken as JSON."""
    for route, fields in [("completions", {"max_tokens": 1}), ("length/predict", {})]:
        body = json.dumps({"model": MODEL, "prompt": "Hi", **fields}).encode()
        for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
            response = httpx.post(f"{url}/v1/{route}", content=body, headers={"Content-Type": kind})
            assert response.status_code == 415, (route, kind, response.text)
            error = response.json()["error"]
            assert error["type"] == "invalid_request_error" and error["code"] == 415
            assert "Content-Type: application/json" in error["message"] and repr(kind) in error["message"]
        for kind in ("application/json; charset=utf-8", "Application/JSON", "application/vnd.lenvm+json", ""):
            response = httpx.post(f"{url}/v1/{route}", content=body, headers={"Content-Type": kind})
            assert response.status_code == 200, (route, kind, response.text)
        assert httpx.post(f"{url}/v1/{route}", content=body).status_code == 200  # no Content-Type
    # What OpenAI's client sends
    sent = []
    hooks = {"request": [lambda request: sent.append(request.headers.get("content-type"))]}
    openai_client = client(url, http_client=httpx.Client(event_hooks=hooks))
    openai_client.completions.create(model=MODEL, prompt="Hi", max_tokens=1)
    assert sent == ["application/json"]


def test_a_byte_order_mark_before_the_json_is_taken_as_vllm_takes_it(url):
    body = codecs.BOM_UTF8 + json.dumps({"model": MODEL, "prompt": "Hi", "max_tokens": 2}).encode()
    response = httpx.post(url + "/v1/completions", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 2


def test_oversized_bodies_and_unknown_routes(engine):
    with running(engine, max_body_bytes=2000) as (url, _):
        big = json.dumps({"model": MODEL, "prompt": "x" * 5000})
        response = httpx.post(
            url + "/v1/completions", content=big, headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 413 and "exceeds" in response.json()["error"]["message"]

        def chunked():  # no Content-Length: counted as it arrives
            for _ in range(10):
                yield b"x" * 500

        response = httpx.post(url + "/v1/completions", content=chunked())
        assert response.status_code == 413
        assert httpx.get(url + "/v1/nothing").json()["error"]["code"] == 404
        assert httpx.get(url + "/v1/completions").status_code == 405
        healthy(url)


def test_a_server_without_lenvm_refuses_controls(tiny_generator):
    with running(Engine(*tiny_generator)) as (url, _):
        with pytest.raises(openai.BadRequestError, match="no LenVM"):
            client(url).completions.create(
                model=MODEL, prompt="Hi", max_tokens=4, extra_body={"length_at_most": 3}
            )
        response = httpx.post(url + "/v1/length/predict", json={"prompt": "Hi"})
        assert response.status_code == 400 and "no LenVM" in response.text
        healthy(url)


def test_api_key(engine, monkeypatch):
    with running(engine, api_key="s3cret") as (url, _):
        with pytest.raises(openai.AuthenticationError):
            client(url).completions.create(model=MODEL, prompt="Hi", max_tokens=2)
        response = httpx.post(
            url + "/v1/length/predict", json={"prompt": "Hi"}, headers={"Authorization": "Bearer no"}
        )
        assert response.status_code == 401
        assert httpx.get(url + "/health").status_code == 200  # health and metrics stay open
        assert httpx.head(url + "/health").status_code == 200  # as load balancers probe it
        answer = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0).completions.create(
            model=MODEL, prompt="Hi", max_tokens=2
        )
        assert answer.usage.completion_tokens == 2


@pytest.mark.parametrize(
    ("key", "why"),
    [
        ("ключ-🔑", r"character 1 \(U\+043A\) is not"),  # no client can send it: headers carry ASCII
        ("s3cret\u00e9", r"character 7 \(U\+00E9\) is not"),  # read back as Latin-1, never equal to its UTF-8
        ("two words", r"character 4 \(U\+0020\) is not"),
        (" s3cret", r"character 1 \(U\+0020\) is not"),  # the server reads the key without surrounding spaces
        ("s3cret\t", r"character 7 \(U\+0009\) is not"),
        ("", "must be a non-empty string"),
    ],
)
def test_an_api_key_no_client_could_send_is_refused_at_construction(key, why):
    from lenvm.io import InputError

    with pytest.raises(InputError, match=f"^api_key .*{why}") as refused:
        ServerSettings(served_model_name=MODEL, api_key=key)
    assert key.strip() == "" or key not in str(refused.value)  # a secret: not repeated


def test_full_queue_and_too_many_streams_get_429(engine):
    with running(engine, batch_size=1, max_waiting=1, max_streams=2) as (url, app):
        c = client(url)
        long = {
            "model": MODEL,
            "prompt": "Hi",
            "max_tokens": 900,
            "stream": True,
            "extra_body": {"ignore_eos": True},
        }
        # answered with headers at once: one running, one waiting for the row
        first, second = c.completions.create(**long), c.completions.create(**long)
        with pytest.raises(openai.RateLimitError, match="streams"):
            c.completions.create(**long)
        with pytest.raises(openai.RateLimitError, match="full"):
            c.completions.create(model=MODEL, prompt="Hi", max_tokens=2)
        with pytest.raises(openai.BadRequestError, match="exceed"):  # more than it ever holds
            c.completions.create(model=MODEL, prompt="Hi", max_tokens=2, n=3)
        first.close(), second.close()
        wait_until(lambda: app.state.lenvm.runner.outstanding == 0)
        healthy(url)
        metrics = httpx.get(url + "/metrics").text
        assert 'lenvm_requests_total{endpoint="completions",outcome="rejected"} 2.0' in metrics
        assert 'lenvm_requests_total{endpoint="completions",outcome="cancelled"} 2.0' in metrics


def test_length_requests_take_places_in_the_queue_and_turns_with_decoding(engine, lenvm, monkeypatch):
    """A length request holds a place of the batch and queue while it runs: a burst beyond them
    gets 429s. While a stream decodes, the length requests' forwards run one between two steps."""
    import lenvm.serve.app as app_module

    monkeypatch.setattr(app_module, "PREDICT_CHUNK_TOKENS", 4)  # a forward per prompt
    go = threading.Event()
    events = []
    original = lenvm.predict_values

    def gated(prompts):
        go.wait(30)
        events.append("call" if runner.scheduler.busy else "idle call")
        return original(prompts)

    monkeypatch.setattr(lenvm, "predict_values", gated)
    with running(engine, batch_size=1, max_waiting=2) as (url, app):
        runner = app.state.lenvm.runner
        step = runner._step
        monkeypatch.setattr(runner, "_step", lambda: (events.append("step"), step()))
        long = {"model": MODEL, "prompt": "Hi", "max_tokens": 900, "extra_body": {"ignore_eos": True}}
        stream = client(url).completions.create(**long, stream=True)
        next(iter(stream))  # decoding: one of the three places taken
        answers = []

        def predict():
            body = {"prompt": [[7, 8, 9]] * 3}
            answers.append(httpx.post(url + "/v1/length/predict", json=body, timeout=60))

        senders = [threading.Thread(target=predict) for _ in range(4)]
        try:
            for t in senders:
                t.start()
            wait_until(lambda: len(answers) == 2)  # the first forward holds the engine meanwhile
            assert [a.status_code for a in answers] == [429, 429]
            assert all("full" in a.json()["error"]["message"] for a in answers)
            assert runner.outstanding == 3
        finally:
            go.set()
            for t in senders:
                t.join(60)
        assert sorted(a.status_code for a in answers) == [200, 200, 429, 429]
        calls = [i for i, event in enumerate(events) if event == "call"]
        assert len(calls) == 6, events
        assert all(events[i - 1] == "step" for i in calls[1:]), events[calls[0] - 1 :]  # never two in a row
        stream.close()
        wait_until(lambda: runner.outstanding == 0)
        counted = app.state.metrics.registry.get_sample_value
        assert counted("lenvm_requests_total", {"endpoint": "length_predict", "outcome": "rejected"}) == 2
        assert counted("lenvm_requests_total", {"endpoint": "length_predict", "outcome": "ok"}) == 2


def test_best_of_attempts_count_toward_the_queue(engine):
    """Each best_of attempt takes a row: a server that holds two answers refuses best_of 3, and a
    best_of 2 answer fills it."""
    with running(engine, batch_size=1, max_waiting=1) as (url, app):
        c = client(url)
        with pytest.raises(openai.BadRequestError, match="length_best_of"):
            c.completions.create(
                model=MODEL,
                prompt="Hi",
                max_tokens=20,
                extra_body={"length_equal_to": 3, "length_best_of": 3},
            )
        held = c.completions.create(model=MODEL, prompt="Hi", max_tokens=900, stream=True,
                                    extra_body={"length_equal_to": 800, "length_best_of": 2})  # fmt: skip
        with pytest.raises(openai.RateLimitError, match="full"):
            c.completions.create(model=MODEL, prompt="Hi", max_tokens=2)
        held.close()
        wait_until(lambda: app.state.lenvm.runner.outstanding == 0)
        healthy(url)


def test_streams_that_arrive_together_are_held_to_max_streams(engine):
    """The stream limit is reserved as it is checked: four streams sent at once to a server that
    holds two get two answers and two 429s (all four were answered)."""
    with running(engine, batch_size=1, max_waiting=8, max_streams=2) as (url, app):
        body = {"model": MODEL, "prompt": "Hi", "max_tokens": 900, "stream": True, "ignore_eos": True}
        barrier, statuses, opened = threading.Barrier(4), [], []

        def send():
            http = httpx.Client(timeout=60)
            barrier.wait()
            response = http.send(http.build_request("POST", url + "/v1/completions", json=body), stream=True)
            statuses.append(response.status_code)
            opened.append((http, response))

        threads = [threading.Thread(target=send) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(statuses) == [200, 200, 429, 429]
        for http, response in opened:
            response.close()
            http.close()
        wait_until(lambda: app.state.lenvm.runner.outstanding == 0 and app.state.lenvm.streams == 0)


def wait_until(condition, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_client_that_goes_away_frees_its_row(engine):
    with running(engine) as (url, app):
        runner = app.state.lenvm.runner
        long = {"model": MODEL, "prompt": "Hi", "max_tokens": 900, "extra_body": {"ignore_eos": True}}
        stream = client(url).completions.create(**long, stream=True)
        next(iter(stream))
        assert runner.scheduler.running == 1
        stream.close()
        wait_until(lambda: runner.scheduler.running == 0 and runner.outstanding == 0)
        # a non-streaming request whose client times out is dropped too
        with pytest.raises(openai.APITimeoutError):
            client(url).with_options(timeout=0.3, max_retries=0).completions.create(**long)
        wait_until(lambda: runner.scheduler.running == 0 and runner.outstanding == 0)
        healthy(url)
        metrics = httpx.get(url + "/metrics").text
        assert 'lenvm_requests_total{endpoint="completions",outcome="cancelled"} 2.0' in metrics
        assert 'lenvm_requests_total{endpoint="completions",outcome="error"} 0.0' in metrics


def test_a_stream_whose_client_resets_stops_writing_to_it(engine, monkeypatch, caplog):
    """Chunks queued while the client resets its connection: the stream lets the event loop see
    the reset before it writes on, instead of writing each of them to the dead socket (which
    asyncio logs as "socket.send() raised exception.", with no client or path)."""
    caplog.set_level(logging.WARNING, logger="asyncio")
    with running(engine, batch_size=1) as (url, app):
        runner = app.state.lenvm.runner
        submit, submissions, puts = runner.submit, [], []

        def counted_submit(choices):
            submission = submit(choices)
            put = submission.put
            submission.put = lambda item: (puts.append(1), put(item))
            submissions.append(submission)
            return submission

        monkeypatch.setattr(runner, "submit", counted_submit)
        body = json.dumps(
            {"model": MODEL, "prompt": "Hi", "max_tokens": 900, "stream": True, "ignore_eos": True}
        )
        head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
        sock = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=30)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close() resets
        sock.sendall((head + body).encode())
        received = b""
        while b"data: " not in received:  # the stream has begun
            received += sock.recv(65536)
        # The server's event loop held up while the client resets and the engine queues chunks:
        # what a busy loop sees when the chunks come faster than it writes them.
        held, release = threading.Event(), threading.Event()
        submissions[0].loop.call_soon_threadsafe(lambda: (held.set(), release.wait(30)))
        assert held.wait(30)
        sock.close()
        queued = len(puts)
        wait_until(lambda: len(puts) >= queued + 20)
        release.set()
        counted = app.state.metrics.registry.get_sample_value
        wait_until(
            lambda: counted("lenvm_requests_total", {"endpoint": "completions", "outcome": "cancelled"}) == 1
        )
        wait_until(lambda: runner.outstanding == 0 and app.state.lenvm.streams == 0)
    warned = [r.getMessage() for r in caplog.records if r.name == "asyncio"]
    assert not [m for m in warned if "socket.send() raised exception" in m], warned


def test_a_stream_whose_client_stops_reading_is_ended_after_the_stall_timeout(engine, caplog):
    """A client that sends a streaming request and never reads holds its stream's place until an
    event has waited the stall timeout to be sent: then its stream ends as if it had gone away
    (rows and place freed, counted as cancelled, its log line says why) and another stream gets
    through. uvicorn's error on the unfinished response is left out: the request's line says it."""
    from lenvm.serve.app import _StalledStreamsNote, server_config

    caplog.set_level(logging.INFO, logger="lenvm.serve")
    said, shown = [], []  # uvicorn's errors, and those that pass the server's filter
    heard, kept = logging.Handler(), logging.Handler()
    heard.emit, kept.emit = said.append, shown.append  # type: ignore[method-assign]
    kept.addFilter(_StalledStreamsNote())
    uvicorn_log = logging.getLogger("uvicorn.error")
    with running(engine, batch_size=4, max_streams=1, stream_stall_timeout=1.0) as (url, app):
        uvicorn_log.addHandler(heard), uvicorn_log.addHandler(kept)  # after uvicorn set its logging up
        state = app.state.lenvm
        body = json.dumps(
            {
                "model": MODEL,
                "messages": HI,
                "max_tokens": 900,
                "n": 4,
                "ignore_eos": True,
                "stream": True,
                "logprobs": True,
                "top_logprobs": 20,
            }
        )
        head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)  # the server's sends soon wait
        sock.connect(("127.0.0.1", int(url.rsplit(":", 1)[1])))
        sock.sendall((head + body).encode())  # and never reads
        wait_until(lambda: state.streams == 1)
        short = {"model": MODEL, "prompt": "Hi", "max_tokens": 3, "stream": True}
        with pytest.raises(openai.RateLimitError, match="streams"):
            client(url).completions.create(**short)
        # once the socket's buffers are full (megabytes: the engine's speed sets when)
        wait_until(lambda: state.streams == 0 and state.runner.outstanding == 0, timeout=120)
        assert [c.choices[0].text for c in client(url).completions.create(**short)]
        counted = app.state.metrics.registry.get_sample_value
        assert counted("lenvm_requests_total", {"endpoint": "chat", "outcome": "cancelled"}) == 1
        sock.close()
        uvicorn_log.removeHandler(heard), uvicorn_log.removeHandler(kept)
    lines = [r.getMessage() for r in caplog.records if r.name == "lenvm.serve"]
    assert [line for line in lines if "chat/completions" in line and "stopped reading" in line], lines
    assert [r for r in said if "without completing" in r.getMessage()]
    assert not [r for r in shown if "without completing" in r.getMessage()]
    config = server_config(
        create_app(engine, ServerSettings(served_model_name=MODEL)), "127.0.0.1", 0, "info"
    )
    assert "lenvm_stalls" in config.log_config["loggers"]["uvicorn.error"]["filters"]


async def _post_then_disconnect(app, path: str) -> list[dict]:
    """POST half a body to ``app`` (ASGI, no socket), then the client disconnects; the messages sent."""
    messages = iter([{"type": "http.request", "body": b'{"prompt": "Hi', "more_body": True}])
    sent = []

    async def receive():
        return next(messages, {"type": "http.disconnect"})

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [(b"content-type", b"application/json")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    await app(scope, receive, send)
    return sent


@pytest.mark.parametrize(
    ("path", "endpoint"), [("/v1/completions", "completions"), ("/v1/length/predict", "length_predict")]
)
def test_a_client_that_goes_away_while_sending_its_body_is_cancelled_not_an_error(engine, path, endpoint):
    app = create_app(engine, ServerSettings(served_model_name=MODEL))
    sent = asyncio.run(_post_then_disconnect(app, path))
    assert sent[0]["status"] == 499
    counted = app.state.metrics.registry.get_sample_value
    assert counted("lenvm_requests_total", {"endpoint": endpoint, "outcome": "cancelled"}) == 1
    assert not counted("lenvm_requests_total", {"endpoint": endpoint, "outcome": "error"})


def test_a_failed_step_answers_500_and_the_engine_goes_on(engine, monkeypatch):
    with running(engine) as (url, app):
        runner = app.state.lenvm.runner
        step = type(runner.scheduler).step
        calls = []

        def failing_once(self):
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("boom")
            return step(self)

        monkeypatch.setattr(type(runner.scheduler), "step", failing_once)
        with pytest.raises(openai.InternalServerError, match="boom"):
            client(url).completions.create(model=MODEL, prompt="Hi", max_tokens=3)
        healthy(url)


class _GatedTokenizer:
    """A tokenizer that holds the text "slow" until ``gate`` opens (a long text's tokenization)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.entered, self.gate = threading.Event(), threading.Event()

    def __call__(self, text, **kwargs):
        if text == "slow":
            self.entered.set()
            self.gate.wait(10)
        return self.tokenizer(text, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def test_a_slow_tokenization_leaves_the_server_answering(tiny_generator):
    """Prompts are tokenized off the event loop: while one takes long, health checks and token-id
    requests are answered."""
    model, tokenizer = tiny_generator
    gated = _GatedTokenizer(tokenizer)
    with running(Engine(model, gated)) as (url, _):
        answers = []
        slow = threading.Thread(
            target=lambda: answers.append(
                client(url).completions.create(model=MODEL, prompt="slow", max_tokens=2)
            )
        )
        slow.start()
        try:
            assert gated.entered.wait(10)
            assert httpx.get(url + "/health", timeout=2).status_code == 200
            ids = (
                client(url)
                .with_options(timeout=5)
                .completions.create(model=MODEL, prompt=[5, 6], max_tokens=2)
            )
            assert ids.usage.completion_tokens == 2 and answers == []
        finally:
            gated.gate.set()
            slow.join(10)
        assert answers[0].usage.completion_tokens == 2


# -- concurrency ------------------------------------------------------------------------------------


def test_concurrent_requests_share_the_batch(engine):
    """Requests sent together decode in one batch, and each gets the answer it gets alone."""
    with running(engine, batch_size=8) as (url, app):
        runner = app.state.lenvm.runner
        seen = []
        step = runner.scheduler.step

        def watched():
            seen.append(runner.scheduler.running + len(runner.scheduler.waiting))
            return step()

        runner.scheduler.step = watched

        async def main():
            # Closed inside the loop: a client left to the garbage collector closes its
            # connections after the loop is gone (an unraisable exception in a later test).
            async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0) as c:
                return await asyncio.gather(
                    *[c.completions.create(model=MODEL, prompt="Hi", max_tokens=40, seed=s) for s in range(6)]
                )

        answers = asyncio.run(main())
        assert max(seen) >= 4  # several requests were in the batch at once
        for s, answer in enumerate(answers):
            assert (
                answer.choices[0].text
                == client(url)
                .completions.create(model=MODEL, prompt="Hi", max_tokens=40, seed=s)
                .choices[0]
                .text
            )


def test_load_every_request_is_answered_exactly_once(engine):
    """200 requests, 16 at a time, mixed controls and endpoints, a tenth cancelled mid-stream: each
    is answered once (or cancelled by its client), the server's counters agree, and it is healthy
    and idle afterwards."""
    total, concurrency = 200, 16
    controls = [
        {},
        {"vllm_xargs": {"length_equal_to": 6}},
        {"vllm_xargs": {"length_at_most": 5}},
        {"length_at_least": 4},
        {"length_tilt": 2.0, "return_values": True},
    ]
    with running(engine, batch_size=8, max_waiting=64) as (url, app):
        outcomes: dict[int, list[str]] = {}

        async def one(c, i):
            kind = ["completions", "chat"][i % 2]
            stream = i % 3 == 0
            cancel = i % 10 == 3
            extra = controls[i % len(controls)]
            args = {"model": MODEL, "max_tokens": 12, "seed": i, "extra_body": extra}
            if cancel:  # long enough that the server cannot have finished when the client leaves
                args.update(max_tokens=500, extra_body={"ignore_eos": True})
            if kind == "chat":
                call = c.chat.completions.create(messages=HI, stream=stream or cancel, **args)
            else:
                call = c.completions.create(prompt="Hi there", stream=stream or cancel, **args)
            response = await call
            if stream or cancel:
                chunks = 0
                async for chunk in response:
                    chunks += 1
                    if cancel and chunks == 2:
                        break  # closing a stream inside its own iteration leaves it half-run
                    if chunk.choices and chunk.choices[0].finish_reason is not None:
                        outcomes.setdefault(i, []).append(kind)
                if cancel and chunks == 2:
                    await response.close()
                    outcomes.setdefault(i, []).append("cancelled")
            else:
                assert response.choices[0].finish_reason in ("stop", "length")
                outcomes.setdefault(i, []).append(kind)

        async def main():
            gate = asyncio.Semaphore(concurrency)
            async with openai.AsyncOpenAI(
                base_url=url + "/v1", api_key="none", max_retries=0, timeout=120
            ) as c:

                async def bounded(i):
                    async with gate:
                        await one(c, i)

                await asyncio.wait_for(asyncio.gather(*[bounded(i) for i in range(total)]), timeout=300)

        asyncio.run(main())
        assert sorted(outcomes) == list(range(total))
        assert all(len(v) == 1 for v in outcomes.values())
        runner = app.state.lenvm.runner
        wait_until(lambda: runner.outstanding == 0 and not runner.scheduler.busy)
        metrics = httpx.get(url + "/metrics").text
        counted = {}
        for line in metrics.splitlines():
            if line.startswith("lenvm_requests_total{"):
                counted[line.split("{")[1].split("}")[0]] = float(line.rsplit(" ", 1)[1])
        expected = {
            kind: sum(v == [kind] for v in outcomes.values()) for kind in ("completions", "chat", "cancelled")
        }
        assert counted['endpoint="completions",outcome="ok"'] == expected["completions"]
        assert counted['endpoint="chat",outcome="ok"'] == expected["chat"]
        assert (
            sum(v for k, v in counted.items() if k.endswith('outcome="cancelled"')) == expected["cancelled"]
        )
        assert sum(counted.values()) == total
        healthy(url)


# -- the command line and shutdown -------------------------------------------------------------------


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unlimited_shutdown_timeout_waits_without_an_error(engine, monkeypatch):
    """inf (or a timeout too long for a timer) leaves requests in flight to finish however long."""
    failures = []
    monkeypatch.setattr(threading, "excepthook", failures.append)
    app = create_app(engine, ServerSettings(served_model_name=MODEL, shutdown_timeout=float("inf")))
    aborted = []
    monkeypatch.setattr(app.state.lenvm.runner, "abort_all", aborted.append)
    app.state.lenvm.begin_shutdown()
    time.sleep(0.2)  # time for a timer thread, had one started, to fail
    assert failures == [] and aborted == []


@pytest.fixture
def kept_loggers(monkeypatch):
    """serve() sets up the server's loggers, its own no longer propagating to the root: kept from
    the tests after the one that calls it, whose caplog (before pytest 9.2) listens at the root
    only."""
    for name in ("lenvm.serve", "uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        for attribute in ("handlers", "level", "propagate", "disabled"):
            value = getattr(logger, attribute)
            monkeypatch.setattr(logger, attribute, list(value) if attribute == "handlers" else value)


def test_a_keyless_local_server_answers_only_its_loopback_names(engine):
    """A page that points its own name at 127.0.0.1 (DNS rebinding) sends that name as Host: a
    server on loopback without a key refuses it on /v1, and answers its loopback names."""
    with running(engine, loopback_names_only=True) as (url, _):
        for host in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example", "10.0.0.1"):
            response = httpx.get(url + "/v1/models", headers={"Host": host})
            assert response.status_code == 403, host
            assert "loopback names only" in response.json()["error"]["message"], host
        refused = httpx.post(url + "/v1/completions", json={"prompt": "Hi"}, headers={"Host": "evil.example"})
        assert refused.status_code == 403
        for host in ("localhost", "LOCALHOST.:80", "127.0.0.1:8000", "127.0.0.2", "[::1]:8000"):
            assert httpx.get(url + "/v1/models", headers={"Host": host}).status_code == 200, host
        assert httpx.get(url + "/health", headers={"Host": "evil.example"}).status_code == 200
        assert (
            client(url).completions.create(model=MODEL, prompt="Hi", max_tokens=2).usage.completion_tokens
            == 2
        )


@pytest.mark.parametrize(
    ("host", "api_key", "guarded"),
    [
        ("127.0.0.1", None, True),
        ("localhost", None, True),
        ("::1", None, True),
        ("127.0.0.1", "key", False),
        ("0.0.0.0", None, False),
    ],
)
def test_serve_guards_its_names_where_it_listens_on_loopback_without_a_key(
    engine, monkeypatch, kept_loggers, host, api_key, guarded
):
    from lenvm.serve import app as server_app

    made = []
    monkeypatch.setattr(server_app._Server, "run", lambda self, sockets=None: None)  # not started
    monkeypatch.setattr(server_app, "check_address", lambda host, port: None)  # ::1 may not exist here
    real = server_app.create_app

    def create_app(engine, settings):
        made.append(settings)
        return real(engine, settings)

    monkeypatch.setattr(server_app, "create_app", create_app)
    serve(engine, ServerSettings(served_model_name=MODEL, api_key=api_key), host=host, port=0)
    assert made[0].loopback_names_only == guarded


@pytest.mark.parametrize(
    ("host", "api_key", "warned"),
    [("0.0.0.0", None, True), ("::", None, True), ("0.0.0.0", "key", False), ("127.0.0.1", None, False)],
)
def test_listening_beyond_this_machine_without_a_key_is_warned_of(
    engine, monkeypatch, capsys, kept_loggers, host, api_key, warned
):
    from lenvm.serve import app as server_app

    monkeypatch.setattr(server_app._Server, "run", lambda self, sockets=None: None)  # not started
    serve(engine, ServerSettings(served_model_name=MODEL, api_key=api_key), host=host, port=0)
    said = capsys.readouterr().err
    assert (f"listening on {host} without an API key" in said) == warned, said


def test_serve_runs_inside_a_running_event_loop_until_interrupted(engine, monkeypatch, kept_loggers):
    """A notebook's kernel runs an event loop, beside which uvicorn cannot start its own: the server
    runs in a worker thread there, and Ctrl-C in the kernel stops it as it stops `lenvm serve`."""
    url = f"http://127.0.0.1:{(port := free_port())}"
    answered, cell_done = [], threading.Event()

    def up() -> bool:
        with contextlib.suppress(httpx.TransportError):
            return httpx.get(url + "/health", timeout=1).status_code == 200
        return False

    def user() -> None:
        try:
            wait_until(up)
            answer = client(url).completions.create(model=MODEL, prompt="Hi", max_tokens=2)
            answered.append(answer.usage.completion_tokens)
        finally:
            if not cell_done.is_set():
                signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)  # Ctrl-C

    async def notebook_cell():
        serve(engine, ServerSettings(served_model_name=MODEL), port=port, log_level="warning")

    # Ctrl-C raises in a kernel, even where pytest itself was started ignoring SIGINT (in the
    # background by a shell), which the server would rightly keep ignoring.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    thread = threading.Thread(target=user, daemon=True)
    thread.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            asyncio.new_event_loop().run_until_complete(notebook_cell())
    finally:
        cell_done.set()
        thread.join()
        signal.signal(signal.SIGINT, previous)
    assert answered == [2] and not up()


@pytest.mark.parametrize(
    ("signals", "timeout", "message"),
    [([signal.SIGTERM], "1", "shut down"), ([signal.SIGINT, signal.SIGINT], "inf", "interrupted")],
    ids=["sigterm", "ctrl-c-twice"],
)
def test_a_shutdown_lets_requests_in_flight_finish_or_answers_them(
    tiny_path, tmp_path, signals, timeout, message
):
    """`lenvm serve` in its own process: on SIGTERM (or Ctrl-C) a short stream in flight finishes,
    long requests are answered with an error once the shutdown timeout has passed, or at a second
    Ctrl-C; none is dropped silently."""
    # The tiny model with a long context: a fast machine decodes a whole 1,024-token context within
    # the shutdown timeout, and the long stream must still be running when it ends.
    model = tmp_path / "long-context"
    shutil.copytree(tiny_path, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 2**17}))
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lenvm.cli",
            "serve",
            "--model",
            str(model),
            "--port",
            str(port),
            "--served-model-name",
            MODEL,
            "--shutdown-timeout",
            timeout,
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.stdout.read().decode()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)
        events: dict[str, list[str]] = {"short": [], "long": []}

        def read(name, max_tokens):
            body = {
                "model": MODEL,
                "prompt": "Hi",
                "max_tokens": max_tokens,
                "stream": True,
                "ignore_eos": True,
                "logprobs": 0,  # counts the tokens: a chunk may hold a character's pieces
            }
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as response:
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        events[name].append(line[6:])

        plain: list[httpx.Response] = []

        def ask():  # not streamed: its answer is the error itself
            body = {"model": MODEL, "prompt": "Hi", "max_tokens": 2**17 - 10, "ignore_eos": True}
            plain.append(httpx.post(url + "/v1/completions", json=body, timeout=60))

        threads = [threading.Thread(target=read, args=a) for a in (("short", 30), ("long", 2**17 - 10))]
        threads.append(threading.Thread(target=ask))
        for t in threads:
            t.start()
        wait_until(lambda: all(events.values()))
        time.sleep(0.5)  # the plain request is running too
        process.send_signal(signals[0])
        wait_until(lambda: events["short"][-1:] == ["[DONE]"], timeout=30)

        def listening():
            try:
                httpx.get(url + "/health", timeout=1)
            except httpx.TransportError:
                return False
            return True

        wait_until(
            lambda: not listening(), timeout=30
        )  # the first signal was taken (not merged with the next)
        for signum in signals[1:]:  # a second Ctrl-C
            process.send_signal(signum)
        for t in threads:
            t.join(60)
        short, long = events["short"], events["long"]
        assert short[-1] == "[DONE]" and json.loads(short[-2])["choices"][0]["finish_reason"] == "length"
        assert sum(len(json.loads(e)["choices"][0]["logprobs"]["tokens"]) for e in short[:-1]) == 30
        assert long[-1] == "[DONE]" and message in json.loads(long[-2])["error"]["message"]
        assert plain[0].status_code == 503 and message in plain[0].json()["error"]["message"]
        process.wait(60)
        # What the server says while it waits, and at a second Ctrl-C, is what the next one does.
        said = process.stdout.read().decode()
        assert "(CTRL+C to force quit)" not in said
        if len(signals) == 1:  # a second Ctrl-C may come before uvicorn says it waits
            assert "Waiting for connections to close. (Ctrl-C: answer them with an error now;" in said
        assert ("interrupted: answering the requests in flight with an error" in said) == (len(signals) == 2)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    with pytest.raises(httpx.TransportError):
        httpx.get(url + "/health", timeout=2)


def test_each_request_is_logged_in_one_line(url, caplog):
    caplog.set_level(logging.INFO, logger="lenvm.serve")
    client(url).completions.create(model=MODEL, prompt=[5, 6, 7], max_tokens=3)
    httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "Hi", "foo": 1})
    stream = client(url).completions.create(model=MODEL, prompt=[5, 6], max_tokens=2, stream=True)
    list(stream)
    httpx.head(url + "/health")

    def lines():
        return [r.getMessage() for r in caplog.records if r.name == "lenvm.serve"]

    wait_until(lambda: len(lines()) >= 4, timeout=5)  # a stream's line follows its last event
    long = {"prompt": [5, 6], "max_tokens": 900, "stream": True, "extra_body": {"ignore_eos": True}}
    abandoned = client(url).completions.create(model=MODEL, **long)
    next(iter(abandoned))
    abandoned.close()  # the client goes away mid-stream
    wait_until(lambda: len(lines()) >= 5, timeout=5)
    assert len(lines()) == 5, lines()
    ok, invalid, streamed, health, gone = lines()
    assert gone.endswith(": the client went away before the answer was complete"), gone
    assert '"POST /v1/completions" 200 ' in ok and ok.endswith("s prompt_tokens=3 completion_tokens=3")
    assert '"POST /v1/completions" 400 ' in invalid and invalid.endswith(": unknown field 'foo'")
    assert streamed.endswith("prompt_tokens=2 completion_tokens=2")
    assert '"HEAD /health" 200 ' in health


def test_a_paths_control_characters_are_escaped_in_its_log_line(url, caplog):
    """A line break or a terminal's escape in a (decoded) path neither forges a log line nor
    reaches the terminal; a plain path stays as it is."""
    caplog.set_level(logging.INFO, logger="lenvm.serve")
    assert httpx.get(url + "/forged%0AINFO:%20fake%20line%1B%5B2J").status_code == 404
    assert httpx.get(url + "/plain/path-ok").status_code == 404

    def lines():
        return [
            m
            for m in (r.getMessage() for r in caplog.records if r.name == "lenvm.serve")
            if "forged" in m or "plain/path-ok" in m
        ]

    wait_until(lambda: len(lines()) >= 2, timeout=5)
    [forged] = [line for line in lines() if "forged" in line]
    [plain] = [line for line in lines() if "plain/path-ok" in line]
    assert '"GET "/forged\\nINFO: fake line\\u001b[2J"" 404 ' in forged, forged
    assert '"GET /plain/path-ok" 404 ' in plain, plain


class _FailingTokenizer(_GatedTokenizer):
    """A tokenizer that fails on the text "fail" (a bug in the tokenizer)."""

    def __call__(self, text, **kwargs):
        if text == "fail":
            raise RuntimeError("tokenizer bug")
        return self.tokenizer(text, **kwargs)


def test_an_unexpected_error_is_logged_with_its_traceback(tiny_generator, caplog):
    """A 500 from a bug logs its traceback; a client's error (4xx) only its request line."""
    caplog.set_level(logging.INFO, logger="lenvm.serve")
    model, tokenizer = tiny_generator
    with running(Engine(model, _FailingTokenizer(tokenizer))) as (url, _):
        failed = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "fail"}, timeout=30)
        refused = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "Hi", "foo": 1})
    assert (failed.status_code, refused.status_code) == (500, 400)
    traced = [r for r in caplog.records if r.name == "lenvm.serve" and r.exc_info is not None]
    assert len(traced) == 1 and str(traced[0].exc_info[1]) == "tokenizer bug"


def test_a_failure_writing_a_whole_answer_is_a_json_error_counted_as_one(engine, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="lenvm.serve")

    def broken(self, chunks):
        raise RuntimeError("writer bug")

    monkeypatch.setattr(Writer, "answer", broken)
    with running(engine) as (url, app):
        failed = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2})
        counted = app.state.metrics.registry.get_sample_value
        outcomes = {
            o: counted("lenvm_requests_total", {"endpoint": "completions", "outcome": o})
            for o in ("ok", "error")
        }
    assert failed.status_code == 500
    assert failed.json()["error"]["message"] == "internal error: RuntimeError: writer bug"
    assert outcomes == {"ok": 0, "error": 1}
    traced = [r for r in caplog.records if r.name == "lenvm.serve" and r.exc_info is not None]
    assert len(traced) == 1 and str(traced[0].exc_info[1]) == "writer bug"


def test_a_whole_answer_is_written_off_the_event_loop(url, monkeypatch):
    """A big answer (n choices of many tokens with alternatives) takes a while to write: the server
    answers other requests meanwhile."""
    writing, health_answered = threading.Event(), threading.Event()
    original = Writer.answer

    def slow(self, chunks):
        writing.set()
        health_answered.wait(10)  # on the event loop, /health could not answer meanwhile
        return original(self, chunks)

    monkeypatch.setattr(Writer, "answer", slow)
    answers = []
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 2}
    thread = threading.Thread(
        target=lambda: answers.append(httpx.post(url + "/v1/completions", json=body, timeout=30))
    )
    thread.start()
    try:
        assert writing.wait(30)
        health = httpx.get(url + "/health", timeout=5)
    finally:
        health_answered.set()
        thread.join()
    assert health.status_code == 200
    assert answers[0].status_code == 200 and answers[0].json()["usage"]["completion_tokens"] == 2


def test_the_server_logs_its_own_request_lines_at_its_log_level(engine):
    from lenvm.serve.app import server_config

    app = create_app(engine, ServerSettings(served_model_name=MODEL))
    config = server_config(app, "127.0.0.1", 0, "info")
    assert config.access_log is False  # uvicorn's line would repeat ours, without tokens or errors
    assert config.log_config["loggers"]["lenvm.serve"]["level"] == "INFO"


def test_importing_lenvm_does_not_import_the_server_stack():
    code = (
        "import sys, lenvm, lenvm.decoding, lenvm.cli; print(bool({'fastapi', 'uvicorn'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# -- the same client code against vLLM -----------------------------------------------------------------


@pytest.mark.parametrize("backend", ["lenvm", pytest.param("vllm", marks=pytest.mark.vllm)])
def test_one_client_code_for_lenvm_and_vllm(backend, request):
    """The same client code, only the base URL changed: our server, and `vllm serve` with lenvm's
    processor (where vLLM is installed)."""
    url = request.getfixturevalue("url" if backend == "lenvm" else "vllm_server")
    c = client(url)
    answer = c.completions.create(
        model=MODEL, prompt="Hi", max_tokens=20, seed=1, extra_body={"vllm_xargs": {"length_at_most": 5}}
    )
    choice = answer.choices[0]
    assert choice.finish_reason in ("stop", "length") and isinstance(choice.text, str)
    assert answer.usage.prompt_tokens > 0
    assert answer.usage.completion_tokens <= 6
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
    chunks = list(
        c.chat.completions.create(
            model=MODEL,
            messages=HI,
            max_tokens=8,
            seed=1,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"vllm_xargs": {"length_equal_to": 6}},
        )
    )
    finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finish and finish[-1] in ("stop", "length")
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 8
    with pytest.raises(openai.BadRequestError):
        c.completions.create(
            model=MODEL, prompt="Hi", max_tokens=5, extra_body={"vllm_xargs": {"length_equal_to": -1}}
        )
