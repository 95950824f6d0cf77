import json
import os
import re
import socket
import sys
import threading
import time
import types
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import lenvm.rollouts as rollouts_module
from lenvm.io import InputError
from lenvm.prompts import Prompt, encode_prompt
from lenvm.rollouts import (
    SamplingParams,
    ServerError,
    _token_ids_from_logprobs,
    derive_seed,
    read_rollouts,
    record_problem,
    rollout,
)

PROMPTS = [
    Prompt("a", text="List three colors."),
    Prompt("b", messages=[{"role": "user", "content": "Write a short poem about the sea."}]),
    Prompt("c", text="What is 12 plus 30?", extra={"source": "math"}),
]


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def keys(records):
    return sorted((r["prompt_id"], r["sample_index"]) for r in records)


def test_record_schema(tiny_generator, tmp_path):
    model, tok = tiny_generator
    out = tmp_path / "r.jsonl"
    sampling = SamplingParams(max_new_tokens=8, top_k=20, seed=3)
    summary = rollout(tiny_generator, PROMPTS, out, 2, sampling, batch_size=4, progress=False)
    records = read_rollouts(out)
    assert keys(records) == [(p, i) for p in "abc" for i in range(2)]
    assert summary.completions_written == 6 and summary.prompts_skipped == 0
    assert summary.tokens_generated == sum(r["num_tokens"] for r in records) > 0
    for r in records:
        prompt = next(p for p in PROMPTS if p.id == r["prompt_id"])
        assert r["prompt"] == prompt.to_json()
        assert r["prompt_token_ids"] == encode_prompt(tok, prompt)
        assert r["completion"] == tok.decode(r["completion_token_ids"], skip_special_tokens=True)
        assert r["generator"] == model.name_or_path
        assert r["sampling"] == {
            "temperature": 1.0,
            "top_p": 1.0,
            "top_k": 20,
            "min_p": 0.0,
            "max_new_tokens": 8,
            "seed": 3,
            "backend": "hf",
        }
        assert r.get("meta") == ({"source": "math"} if r["prompt_id"] == "c" else None)
        assert record_problem(r) is None


def test_eos_ends_stopped_completions_only(eos_generator, tmp_path):
    tok = eos_generator[1]
    out = tmp_path / "r.jsonl"
    sampling = SamplingParams(max_new_tokens=6, seed=1)
    summary = rollout(eos_generator, PROMPTS, out, 4, sampling, batch_size=5, progress=False)
    records = read_rollouts(out)
    assert summary.finished > 0 and summary.truncated > 0
    assert summary.finished + summary.truncated == len(records) == 12
    for r in records:
        ids = r["completion_token_ids"]
        eos_at = [i for i, t in enumerate(ids) if t == tok.eos_token_id]
        if r["finish_reason"] == "stop":
            assert eos_at == [len(ids) - 1]  # cut at the first EOS, which is kept; no padding
        else:
            assert eos_at == [] and len(ids) == 6


def test_left_padding_keeps_greedy_outputs(eos_generator, tmp_path):
    greedy = SamplingParams(temperature=0.0, max_new_tokens=10)
    alone, batched = tmp_path / "alone.jsonl", tmp_path / "batched.jsonl"
    rollout(eos_generator, PROMPTS, alone, n=1, sampling=greedy, batch_size=1, progress=False)
    rollout(eos_generator, PROMPTS, batched, n=1, sampling=greedy, batch_size=3, progress=False)
    by_key = {(r["prompt_id"]): r["completion_token_ids"] for r in read_rollouts(alone)}
    assert by_key == {r["prompt_id"]: r["completion_token_ids"] for r in read_rollouts(batched)}


def test_same_seed_same_samples(tiny_generator, tmp_path):
    runs = []
    for name, seed in [("x", 5), ("y", 5), ("z", 6)]:
        out = tmp_path / f"{name}.jsonl"
        sampling = SamplingParams(max_new_tokens=8, seed=seed)
        rollout(tiny_generator, PROMPTS, out, n=2, sampling=sampling, batch_size=3, progress=False)
        runs.append({(r["prompt_id"], r["sample_index"]): r["completion_token_ids"] for r in lines(out)})
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_sample_does_not_depend_on_batch_size(eos_generator, tmp_path):
    # each completion draws from its own seeded stream, so batching changes speed, not samples
    runs = []
    for batch_size in (1, 4):
        out = tmp_path / f"b{batch_size}.jsonl"
        sampling = SamplingParams(max_new_tokens=12, seed=3)
        rollout(eos_generator, PROMPTS, out, n=2, sampling=sampling, batch_size=batch_size, progress=False)
        runs.append({(r["prompt_id"], r["sample_index"]): r["completion_token_ids"] for r in lines(out)})
    assert runs[0] == runs[1]
    assert len({tuple(ids) for ids in runs[0].values()}) > 1


def test_resume_skips_done_and_completes_partial_prompts(tiny_generator, tmp_path):
    out = tmp_path / "r.jsonl"
    sampling = SamplingParams(max_new_tokens=5)
    rollout(tiny_generator, PROMPTS[:2], out, n=3, sampling=sampling, progress=False)
    # Drop sample 1 of prompt "b": that prompt is now partial.
    kept = [r for r in lines(out) if (r["prompt_id"], r["sample_index"]) != ("b", 1)]
    out.write_text("".join(json.dumps(r) + "\n" for r in kept))
    before = out.read_text()

    summary = rollout(tiny_generator, PROMPTS, out, n=3, sampling=sampling, progress=False)
    assert summary.prompts_total == 3 and summary.prompts_skipped == 1
    assert summary.completions_written == 4  # b's sample 1 and c's three
    assert out.read_text().startswith(before)  # append-only
    assert keys(read_rollouts(out)) == [(p, i) for p in "abc" for i in range(3)]

    again = rollout(tiny_generator, PROMPTS, out, n=3, sampling=sampling, progress=False)
    assert again.prompts_skipped == 3 and again.completions_written == 0
    # The time of earlier calls is not known: what is reported says it is this call's.
    assert again.to_dict()["seconds_this_run"] == 0.0 and "seconds" not in again.to_dict()
    printed = summary.to_dict()  # as `lenvm rollout` prints it: to a tenth, as `lenvm train` does
    assert printed["seconds_this_run"] == round(summary.seconds_this_run, 1)
    assert printed["tokens_per_second"] == round(summary.tokens_per_second, 1)


def test_crash_leftover_line_is_repaired(tiny_generator, tmp_path):
    out = tmp_path / "r.jsonl"
    sampling = SamplingParams(max_new_tokens=5)
    rollout(tiny_generator, PROMPTS[:1], out, n=2, sampling=sampling, progress=False)
    records = lines(out)
    # A crash mid-write: the second record's line is cut short.
    out.write_text(json.dumps(records[0]) + "\n" + json.dumps(records[1])[:40])
    summary = rollout(tiny_generator, PROMPTS[:1], out, n=2, sampling=sampling, progress=False)
    assert summary.completions_written == 1
    assert keys(read_rollouts(out)) == [("a", 0), ("a", 1)]


def test_a_whole_last_record_without_its_newline_is_kept(tiny_generator, tmp_path):
    """A file an editor saved (or "\\n".join wrote) ends without a newline: its last record is
    whole, not a crash's leftover, and resuming keeps it, even for a prompt not rolled out now."""
    out = tmp_path / "r.jsonl"
    sampling = SamplingParams(max_new_tokens=3)
    rollout(tiny_generator, PROMPTS[:2], out, n=1, sampling=sampling, progress=False)
    before = lines(out)
    out.write_text("\n".join(json.dumps(r) for r in before))
    summary = rollout(tiny_generator, PROMPTS[:1], out, n=1, sampling=sampling, progress=False)
    assert summary.completions_written == 0 and lines(out) == before
    assert out.read_text().endswith("}\n")
    out.write_text(out.read_text() + "  ")  # whitespace after the last line is nothing
    rollout(tiny_generator, PROMPTS[:1], out, n=1, sampling=sampling, progress=False)
    assert lines(out) == before


def test_an_out_file_that_is_not_rollouts_is_left_as_it_was(tiny_generator, tmp_path):
    out = tmp_path / "prompts.jsonl"  # the prompts file given as --out by mistake, no final newline
    out.write_text('{"id": "a", "prompt": "One."}\n{"id": "b", "prompt": "Two."}')
    before = out.read_bytes()
    with pytest.raises(
        InputError, match=r"prompts.jsonl:1 is not a line of rollouts \(missing 'prompt_id'\)"
    ):
        rollout(
            tiny_generator, PROMPTS[:1], out, n=1, sampling=SamplingParams(max_new_tokens=5), progress=False
        )
    assert out.read_bytes() == before
    # A file of one line without its newline is not taken for a crash's leftover and cut.
    sampling = SamplingParams(max_new_tokens=5)
    for text, message in [('{"lr": 0.1}', "missing 'prompt_id'"), ("hello world", "not a file of rollouts")]:
        out.write_text(text)
        with pytest.raises(InputError, match=message):
            rollout(tiny_generator, PROMPTS[:1], out, n=1, sampling=sampling, progress=False)
        assert out.read_text() == text


def test_a_prompt_too_long_for_the_context_is_named_by_its_id(tiny_generator, tmp_path):
    long = Prompt("long", text="word " * 1200)
    with pytest.raises(InputError, match="prompt 'long': prompt .* exceeds the model's context"):
        rollout(tiny_generator, [PROMPTS[0], long], tmp_path / "r.jsonl", n=1,
                sampling=SamplingParams(max_new_tokens=8), progress=False)  # fmt: skip
    assert not (tmp_path / "r.jsonl").exists()


def test_resume_refuses_a_file_with_a_sample_twice(tiny_generator, tmp_path):
    out = tmp_path / "r.jsonl"
    sampling = SamplingParams(max_new_tokens=3)
    rollout(tiny_generator, PROMPTS[:1], out, n=1, sampling=sampling, progress=False)
    out.write_text(out.read_text() * 2)  # what two runs writing one file at once leave
    with pytest.raises(InputError, match="holds sample 0 of prompt 'a' twice"):
        rollout(tiny_generator, PROMPTS[:1], out, n=2, sampling=sampling, progress=False)


def test_a_second_run_into_the_same_file_is_refused_while_the_first_runs(tiny_generator, tmp_path):
    from lenvm.io import RunLock

    out = tmp_path / "r.jsonl"
    with (
        RunLock(out, "writing rollouts into this file"),
        pytest.raises(InputError, match="another run is writing rollouts"),
    ):
        rollout(
            tiny_generator, PROMPTS[:1], out, n=1, sampling=SamplingParams(max_new_tokens=3), progress=False
        )
    assert not out.exists()  # the held file was created empty, and removed on release
    rollout(tiny_generator, PROMPTS[:1], out, n=1, sampling=SamplingParams(max_new_tokens=3), progress=False)
    assert keys(lines(out)) == [("a", 0)]


def test_resume_refuses_other_sampling_or_prompt(tiny_generator, tmp_path):
    out = tmp_path / "r.jsonl"
    rollout(tiny_generator, PROMPTS[:1], out, n=1, sampling=SamplingParams(max_new_tokens=5), progress=False)
    with pytest.raises(InputError, match="different sampling parameters"):
        rollout(
            tiny_generator, PROMPTS[:1], out, n=2, sampling=SamplingParams(max_new_tokens=6), progress=False
        )
    with pytest.raises(InputError, match="different prompt"):
        rollout(
            tiny_generator,
            [Prompt("a", text="Another question.")],
            out,
            n=2,
            sampling=SamplingParams(max_new_tokens=5),
            progress=False,
        )


def test_resume_refuses_a_prompt_the_file_holds_under_another_id(tiny_generator, tmp_path):
    """An earlier lenvm numbered a prompts file's prompts by position where they had a 'prompt_id'
    field: resumed under their own ids now, they would be sampled again beside the old records."""
    out = tmp_path / "r.jsonl"
    sampling = SamplingParams(max_new_tokens=5)
    rollout(tiny_generator, [Prompt("0", text="Name a colour.")], out, n=1, sampling=sampling, progress=False)
    before = out.read_bytes()
    renamed = [Prompt("q0", text="Name a colour.")]
    with pytest.raises(InputError, match="holds prompt 'q0' under another id, '0'"):
        rollout(tiny_generator, renamed, out, n=1, sampling=sampling, progress=False)
    assert out.read_bytes() == before
    # another prompt under a new id, beside the file's, is sampled as before
    other = [Prompt("q1", text="Name a fruit.")]
    assert (
        rollout(tiny_generator, other, out, n=1, sampling=sampling, progress=False).completions_written == 1
    )


@pytest.mark.parametrize("n", [0, -1, 1.5])
def test_bad_n_rejected(tiny_generator, tmp_path, n):
    with pytest.raises(InputError, match="n "):
        rollout(tiny_generator, PROMPTS, tmp_path / "r.jsonl", n=n, progress=False)


@pytest.mark.parametrize(
    "bad",
    [
        {"temperature": -0.1},
        {"temperature": float("nan")},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"top_k": -1},
        {"top_k": 2.5},
        {"min_p": 1.5},
        {"max_new_tokens": 0},
        {"seed": 2**63},
        {"seed": True},
    ],
)
def test_bad_sampling_rejected(bad):
    with pytest.raises(InputError, match="bad sampling parameters"):
        SamplingParams(**bad)


def test_malformed_rollouts_name_file_and_line(tmp_path):
    good = {
        "prompt_id": "0",
        "sample_index": 0,
        "prompt": "hi",
        "prompt_token_ids": [1, 2],
        "completion": "x",
        "completion_token_ids": [5, 2],
        "finish_reason": "stop",
        "num_tokens": 2,
        "generator": "tiny",
        "sampling": {},
    }
    path = tmp_path / "r.jsonl"
    cases = [
        ("{not json", "malformed JSON"),
        (
            json.dumps({k: v for k, v in good.items() if k != "completion_token_ids"}),
            "missing 'completion_token_ids'",
        ),
        (json.dumps({**good, "finish_reason": "eos"}), "'finish_reason' must be 'stop' or"),
        (json.dumps({**good, "num_tokens": 3}), "num_tokens"),
        (json.dumps({**good, "completion_token_ids": [], "num_tokens": 0}), "end with its EOS"),
        ("[1, 2]", "expected a JSON object"),
    ]
    for bad_line, message in cases:
        path.write_text(json.dumps(good) + "\n\n" + bad_line + "\n")
        with pytest.raises(InputError, match=message) as err:
            read_rollouts(path)
        assert f"{path}:3:" in str(err.value)
    path.write_text(json.dumps(good) + "\n")
    assert read_rollouts(path) == [good]
    with pytest.raises(InputError, match="no such file"):
        read_rollouts(tmp_path / "absent.jsonl")


@pytest.mark.parametrize(
    ("package", "message"),
    [
        (None, "needs the 'datasets' package"),  # not installed
        ("raise ImportError('pyarrow requires NumPy 2.0 or newer')", "fails to import.*requires NumPy 2.0"),
        ("import a_dependency_that_is_not_there", "fails to import.*a_dependency_that_is_not_there"),
    ],
)
def test_a_broken_datasets_install_is_told_apart_from_a_missing_one(tmp_path, monkeypatch, package, message):
    monkeypatch.delitem(sys.modules, "datasets", raising=False)
    if package is None:
        monkeypatch.setitem(sys.modules, "datasets", None)  # what import finds for an absent package
    else:
        (tmp_path / "site" / "datasets").mkdir(parents=True)
        (tmp_path / "site" / "datasets" / "__init__.py").write_text(package + "\n")
        monkeypatch.syspath_prepend(str(tmp_path / "site"))
    (tmp_path / "rollouts-ds").mkdir()
    with pytest.raises(InputError, match=message):
        read_rollouts(tmp_path / "rollouts-ds")


def test_a_datasets_folder_the_installed_datasets_cannot_read_names_the_folder_and_version(
    tmp_path, monkeypatch
):
    def load_from_disk(path):  # what datasets 3 does with a folder written by datasets 5
        raise TypeError("must be called with a dataclass type or instance")

    older = types.ModuleType("datasets")
    older.__dict__.update(__version__="3.0.0", load_from_disk=load_from_disk)
    monkeypatch.setitem(sys.modules, "datasets", older)
    (tmp_path / "rollouts-ds").mkdir()
    with pytest.raises(InputError, match=r"rollouts-ds: the installed datasets 3\.0\.0 cannot read") as err:
        read_rollouts(tmp_path / "rollouts-ds")
    assert "must be called with a dataclass" in str(err.value)


@given(st.lists(st.integers(min_value=0, max_value=2**31)))
def test_token_ids_from_logprobs_round_trip(ids):
    assert _token_ids_from_logprobs({"tokens": [f"token_id:{i}" for i in ids]}) == ids
    assert _token_ids_from_logprobs({"tokens": [f"token_id:{i}" for i in ids] + ["hello"]}) is None


# --- openai backend against a fake server on the loopback interface --------------------------


class FakeServer:
    """Answers POST /v1/completions with ``self.answer(payload) -> (status, body)``."""

    def __init__(self):
        self.requests = []
        self.answer = None
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append((self.path, dict(self.headers), payload))
                status, body = fake.answer(payload)
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    fake = FakeServer()
    yield fake
    fake.close()


def choice(index, ids, finish, as_ids=True, text="red green"):
    tokens = [f"token_id:{i}" for i in ids] if as_ids else ["red", " green"]
    return {
        "index": index,
        "text": text,
        "finish_reason": finish,
        "logprobs": {"tokens": tokens, "token_logprobs": [-0.5] * len(tokens)},
    }


def test_openai_backend_reads_token_ids(server, tiny_path, tiny_generator, tmp_path, monkeypatch):
    tok = tiny_generator[1]
    eos = tok.eos_token_id
    canned = [([40, 41], "stop"), ([42, eos], "stop"), ([43, 44, 45], "length"), ([46], "length")]
    # One request per completion, by its own seed: sample i of a prompt gets canned answer i.
    sample_of = {derive_seed(2, pid, i): i for pid in "ab" for i in range(4)}
    server.answer = lambda p: (200, {"choices": [choice(0, *canned[sample_of[p["seed"]]])]})
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    out = tmp_path / "r.jsonl"
    sampling = SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=3, seed=2)
    summary = rollout(
        str(tiny_path),
        PROMPTS[:2],
        out,
        n=3,
        sampling=sampling,
        backend="openai",
        base_url=server.url,
        api_model="served",
        tokenizer=tok,
        progress=False,
    )
    assert summary.completions_written == 6 and summary.finished == 4 and summary.truncated == 2
    path, headers, payload = server.requests[0]
    assert path == "/v1/completions"
    assert headers["Authorization"] == "Bearer sk-test"
    assert payload["model"] == "served" and payload["n"] == 1 and payload["max_tokens"] == 3
    assert len(server.requests) == 6
    assert payload["temperature"] == 0.7 and payload["top_p"] == 0.9 and payload["top_k"] == -1
    assert payload["logprobs"] == 1 and payload["return_tokens_as_token_ids"] is True
    assert payload["add_special_tokens"] is False
    prompt_a = tok.apply_chat_template(PROMPTS[0].as_messages(), add_generation_prompt=True, tokenize=False)
    assert prompt_a in {p["prompt"] for _, _, p in server.requests}
    records = {(r["prompt_id"], r["sample_index"]): r for r in read_rollouts(out)}
    assert records[("a", 0)]["completion_token_ids"] == [40, 41, eos]  # EOS appended on stop
    assert records[("a", 1)]["completion_token_ids"] == [42, eos]
    assert records[("a", 2)]["completion_token_ids"] == [43, 44, 45]
    assert records[("a", 2)]["finish_reason"] == "length"
    assert records[("a", 0)]["prompt_token_ids"] == encode_prompt(tok, PROMPTS[0])
    assert records[("a", 0)]["generator"] == str(tiny_path)
    assert records[("a", 0)]["sampling"]["backend"] == "openai"
    assert all("token_ids_source" not in r for r in records.values())

    # Resuming with a larger n asks only for the missing sample.
    server.requests.clear()
    rollout(
        str(tiny_path),
        PROMPTS[:2],
        out,
        n=4,
        sampling=sampling,
        backend="openai",
        base_url=server.url,
        api_model="served",
        tokenizer=tok,
        progress=False,
    )
    assert sorted(p["n"] for _, _, p in server.requests) == [1, 1]
    assert keys(read_rollouts(out)) == [(p, i) for p in "ab" for i in range(4)]


def test_openai_backend_keeps_answers_in_flight_on_ctrl_c(
    server, tiny_path, tiny_generator, tmp_path, monkeypatch
):
    """Ctrl-C while requests are in flight: their answers are written (the pool waits for them
    anyway), the requests not yet sent are not sent, and a second run completes the rest."""
    tok = tiny_generator[1]

    def slow_answer(payload):
        time.sleep(0.2)  # so that most requests are still queued at the interrupt
        return 200, {"choices": [choice(0, [40, 41], "length")]}

    server.answer = slow_answer
    real_wait, calls = rollouts_module.wait, []

    def wait_then_interrupt(futures, return_when):
        calls.append(1)
        if len(calls) == 2:
            real_wait([f for f in futures if f.running()])  # the requests in flight come back
            raise KeyboardInterrupt
        return real_wait(futures, return_when=return_when)

    monkeypatch.setattr(rollouts_module, "wait", wait_then_interrupt)
    out = tmp_path / "r.jsonl"
    run = dict(n=4, backend="openai", base_url=server.url, tokenizer=tok, batch_size=2, progress=False)
    with pytest.raises(KeyboardInterrupt):
        rollout(str(tiny_path), PROMPTS[:2], out, **run)
    sent = len(server.requests)
    assert len(read_rollouts(out)) == sent and 2 < sent < 8  # every answer that came back is kept
    monkeypatch.setattr(rollouts_module, "wait", real_wait)
    rollout(str(tiny_path), PROMPTS[:2], out, **run)
    assert len(server.requests) == 8
    assert keys(read_rollouts(out)) == [(p, i) for p in "ab" for i in range(4)]


def test_openai_backend_retokenizes_without_ids(server, tiny_path, tiny_generator, tmp_path):
    tok = tiny_generator[1]
    server.answer = lambda p: (200, {"choices": [choice(0, [], "stop", as_ids=False)]})
    out = tmp_path / "r.jsonl"
    rollout(
        str(tiny_path),
        PROMPTS[:1],
        out,
        n=1,
        backend="openai",
        base_url=server.url,
        tokenizer=tok,
        progress=False,
    )
    [record] = read_rollouts(out)
    expected = tok("red green", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert record["completion_token_ids"] == expected
    assert record["completion"] == "red green"
    assert record["token_ids_source"] == "retokenized"


def test_openai_backend_refuses_a_loaded_generator_without_its_tokenizer(tiny_generator, tmp_path):
    """A (model, None) pair with no tokenizer= has nothing to template with: a clear error, before
    any request, not a TypeError from loading the pair as a tokenizer name."""
    out = tmp_path / "r.jsonl"
    run = dict(n=1, backend="openai", base_url="http://127.0.0.1:1/v1", progress=False)
    with pytest.raises(InputError, match="tokenizer is None"):
        rollout((tiny_generator[0], None), PROMPTS[:1], out, **run)
    assert not out.exists() or read_rollouts(out) == []


def test_openai_backend_errors_name_the_url(server, tiny_path, tiny_generator, tmp_path):
    tok = tiny_generator[1]
    out = tmp_path / "r.jsonl"
    server.answer = lambda p: (500, {"error": "model not loaded"})
    with pytest.raises(ServerError, match=r"/v1/completions answered HTTP 500: .*not loaded"):
        rollout(
            str(tiny_path),
            PROMPTS[:1],
            out,
            n=1,
            backend="openai",
            base_url=server.url,
            tokenizer=tok,
            progress=False,
        )
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ServerError, match=f"cannot reach http://127.0.0.1:{port}/v1/completions"):
        rollout(
            str(tiny_path),
            PROMPTS[:1],
            out,
            n=1,
            backend="openai",
            base_url=f"http://127.0.0.1:{port}/v1",
            tokenizer=tok,
            progress=False,
        )
    with pytest.raises(InputError, match="base_url"):
        rollout(str(tiny_path), PROMPTS[:1], out, n=1, backend="openai", tokenizer=tok)
    # What the server answered, quoted as JSON (raw UTF-8) and cut with an ellipsis.
    server.answer = lambda p: (200, {"error": "模型" * 200})
    with pytest.raises(ServerError, match=r"""answered without a 'choices' list: \{"error": "(模型)+模?…$"""):
        rollout(
            str(tiny_path), PROMPTS[:1], out, n=1, backend="openai", base_url=server.url, tokenizer=tok,
            progress=False,
        )  # fmt: skip
    assert not out.exists() or read_rollouts(out) == []


def test_a_server_answer_that_is_not_json_is_shown_as_text(monkeypatch):
    """Bytes that are not UTF-8 (an HTML page in another encoding) are not JSON either: a
    ServerError showing the text, not a UnicodeDecodeError's traceback."""
    import io
    import urllib.request

    from lenvm.rollouts import _Server

    for body, shown in [
        (b"<html>\xff \xe6\xa8\xa1</html>", '"<html>\ufffd 模</html>"'),
        ("模".encode() * 300, '"' + "模" * 198 + "…"),
    ]:
        monkeypatch.setattr(urllib.request, "urlopen", lambda request, timeout, body=body: io.BytesIO(body))
        with pytest.raises(ServerError) as err:
            _Server("http://127.0.0.1:1/v1", "m", None).post("/completions", {})
        assert (
            str(err.value) == f"http://127.0.0.1:1/v1/completions answered with something not JSON: {shown}"
        )


@pytest.mark.parametrize(
    ("option", "value", "backend", "owner"),
    [
        ("base_url", "http://127.0.0.1:1/v1", "hf", "openai"),
        ("api_model", "m", "hf", "openai"),
        ("api_key", "k", "auto", "openai"),
        ("vllm_args", {"max_model_len": 64}, "hf", "vllm"),
        ("vllm_args", {"max_model_len": 64}, "openai", "vllm"),
        # hf decodes with the generator's own tokenizer: another one would be ignored.
        ("tokenizer", "tok", "hf", "vllm and openai backends"),
        ("tokenizer", "tok", "auto", "vllm and openai backends"),
    ],
)
def test_an_option_of_another_backend_is_refused_not_ignored(
    tiny_generator, tmp_path, monkeypatch, option, value, backend, owner
):
    monkeypatch.setattr(rollouts_module, "vllm_installed", lambda: False)  # auto: our engine
    out = tmp_path / "r.jsonl"
    given = {option: value, "base_url": "http://127.0.0.1:1/v1"} if backend == "openai" else {option: value}
    with pytest.raises(InputError, match=f"{option} is an option of the {owner}"):
        rollout(tiny_generator, PROMPTS[:1], out, n=1, backend=backend, progress=False, **given)
    assert not out.exists()  # refused before anything is sampled


def test_vllm_args_are_a_dict(tiny_generator, tmp_path):
    with pytest.raises(InputError, match="vllm_args must be a dict of vllm.LLM arguments by name, got list"):
        rollout("m", PROMPTS[:1], tmp_path / "r.jsonl", backend="vllm", vllm_args=[1], progress=False)


def test_the_progress_bar_is_redrawn_at_its_interval_not_at_every_completion(
    tiny_generator, tmp_path, monkeypatch, lazy_bars
):
    bar, drawn = lazy_bars
    monkeypatch.setattr(rollouts_module, "tqdm", bar)
    sampling = SamplingParams(max_new_tokens=2)
    summary = rollout(tiny_generator, PROMPTS, tmp_path / "r.jsonl", n=4, sampling=sampling, batch_size=4)
    assert summary.completions_written == 12
    assert drawn.getvalue().count("rollouts") <= 2  # drawn when opened and closed, not 12 times more


def test_auto_backend_uses_our_engine_without_vllm(tiny_path, tiny_generator, tmp_path, monkeypatch):
    monkeypatch.setattr(rollouts_module, "vllm_installed", lambda: False)
    out = tmp_path / "r.jsonl"
    sampling = SamplingParams(max_new_tokens=4)
    summary = rollout(
        str(tiny_path), PROMPTS[:1], out, n=1, sampling=sampling, backend="auto", loaded=tiny_generator,
        progress=False,
    )  # fmt: skip
    assert summary.backend == "hf" and read_rollouts(out)[0]["sampling"]["backend"] == "hf"
    # The same file again, as a plain hf run: nothing left to do.
    again = rollout(tiny_generator, PROMPTS[:1], out, n=1, sampling=sampling, progress=False)
    assert again.completions_written == 0
    # "engine", as the benchmarks name our engine, is the same backend.
    named = rollout(
        tiny_generator, PROMPTS[:1], out, n=1, sampling=sampling, backend="engine", progress=False
    )
    assert named.backend == "hf" and named.completions_written == 0
    # A folder is recorded by its absolute path: the same model however it is spelled, from anywhere.
    assert read_rollouts(out)[0]["generator"] == os.path.abspath(tiny_path)
    monkeypatch.chdir(Path(tiny_path).parent)
    relative = rollout(Path(tiny_path).name, PROMPTS[:2], out, n=1, sampling=sampling, loaded=tiny_generator,
                       progress=False)  # fmt: skip
    assert relative.completions_written == 1


def test_auto_backend_takes_vllm_only_for_a_named_text_generator(tiny_path, tiny_generator, tmp_path):
    from lenvm.rollouts import _auto_backend, vllm_installed

    installed = vllm_installed()
    assert _auto_backend(str(tiny_path), [], True, tmp_path) == ("vllm" if installed else "hf")
    assert _auto_backend(tiny_generator, [], True, tmp_path) == "hf"  # loaded: vLLM cannot take it
    assert _auto_backend(str(tiny_path), [], False, tmp_path) == "hf"  # images: our engine only


def test_auto_backend_resumes_with_the_files_backend(tiny_path, tiny_generator, tmp_path, monkeypatch):
    monkeypatch.setattr(rollouts_module, "vllm_installed", lambda: False)
    out = tmp_path / "r.jsonl"
    sampling = SamplingParams(max_new_tokens=4)
    rollout(tiny_generator, PROMPTS[:1], out, n=1, sampling=sampling, progress=False)
    record = lines(out)[0]
    for backend, message in [("vllm", "install lenvm\\[vllm\\] to resume"), ("openai", "OpenAI-compatible")]:
        other = tmp_path / f"{backend}.jsonl"
        started = {**record, "sampling": {**record["sampling"], "backend": backend}}
        other.write_text(json.dumps(started) + "\n")
        with pytest.raises(InputError, match=message):
            rollout(str(tiny_path), PROMPTS[:2], other, n=1, sampling=sampling, backend="auto")
        assert len(lines(other)) == 1  # nothing written


def test_a_prompts_file_given_as_the_prompts_names_the_reader(tiny_generator, tmp_path):
    """Not a TypeError, nor advice that would roll out the file's name as a prompt."""
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "Hi!"}\n')
    for named in (path, str(path)):
        with pytest.raises(
            InputError, match=r"not the file '.*p.jsonl': read it with lenvm.read_prompts\(path\)"
        ):
            rollout(tiny_generator, named, tmp_path / "r.jsonl", n=1, progress=False)
    assert not (tmp_path / "r.jsonl").exists()


def test_prompts_are_a_list_and_may_be_prompts_file_records(tiny_generator, tmp_path):
    sampling = SamplingParams(max_new_tokens=3)
    with pytest.raises(InputError, match="wrap a single one in a list"):
        rollout(tiny_generator, "Hi!", tmp_path / "r.jsonl", n=1, sampling=sampling, progress=False)
    rollout(tiny_generator, [{"id": "x", "prompt": "Hi!"}], tmp_path / "r.jsonl", n=1, sampling=sampling,
            progress=False)  # fmt: skip
    assert [r["prompt_id"] for r in read_rollouts(tmp_path / "r.jsonl")] == ["x"]


def test_numpy_counts_and_seed_are_taken_and_written_as_ints(tiny_generator, tmp_path):
    sampling = SamplingParams(max_new_tokens=2, seed=np.int64(3))
    out = tmp_path / "r.jsonl"
    rollout(
        tiny_generator,
        PROMPTS[:1],
        out,
        n=np.int64(2),
        sampling=sampling,
        batch_size=np.int64(2),
        progress=False,
    )
    assert sorted(r["sample_index"] for r in read_rollouts(out)) == [0, 1]


def test_a_prompt_is_text_or_messages():
    from lenvm.prompts import as_prompt

    with pytest.raises(InputError, match="'prompt' or 'messages', not both"):  # not one of them, silently
        as_prompt({"id": "x", "prompt": "Hi", "messages": [{"role": "user", "content": "Bye"}]})
    with pytest.raises(InputError, match="'e': give its text or its messages"):
        Prompt("e")  # would reach the chat template as a message without content
    with pytest.raises(InputError, match="one of the two"):
        Prompt("b", text="Hi", messages=[{"role": "user", "content": "Hi"}])
    # A lone surrogate (JSON's "\ud800", or argv bytes that are not UTF-8) is no text a tokenizer takes.
    with pytest.raises(InputError, match="U\\+D800, a lone surrogate"):
        Prompt("s", text="He\ud800llo")
    with pytest.raises(InputError, match="U\\+DCED"):
        as_prompt({"id": "m", "messages": [{"role": "user", "content": "x\udced"}]})


def test_a_prompts_file_names_its_ids_id_or_prompt_id(tmp_path):
    """``prompt_id`` is what rollout records call it: the id, not a field for meta."""
    from lenvm.prompts import read_prompts

    path = tmp_path / "p.jsonl"
    path.write_text(
        '{"prompt_id": "q7", "prompt": "Hi", "source": "x"}\n{"prompt_id": 3, "id": "3", "prompt": "Yo"}\n'
    )
    prompts = read_prompts(path)
    assert [(p.id, p.extra) for p in prompts] == [("q7", {"source": "x"}), ("3", {})]
    path.write_text('{"id": "a", "prompt_id": "b", "prompt": "Hi"}\n')
    with pytest.raises(InputError, match=r"""p.jsonl:1: 'id' \("a"\) and 'prompt_id' \("b"\) name two ids"""):
        read_prompts(path)
    path.write_text('{"prompt_id": "", "prompt": "Hi"}\n')
    with pytest.raises(InputError, match="'prompt_id' must be a non-empty string or an integer, got \"\""):
        read_prompts(path)


def test_messages_quote_values_as_lenvm_writes_text_cut_at_a_character(tmp_path):
    """Ids and field values named in messages are raw UTF-8, as lenvm writes files and the server
    answers; a long one is cut with an ellipsis, at a character, never inside an escape."""
    from lenvm.prompts import read_prompts

    path = tmp_path / "p.jsonl"
    weird = {"type": "weird", "text": "中文" * 40}
    for record, message in [
        (
            {"id": "中文", "prompt_id": "日本", "prompt": "x"},
            """'id' ("中文") and 'prompt_id' ("日本") name two ids: give one""",
        ),
        ({"id": ["模型"], "prompt": "x"}, """'id' must be a non-empty string or an integer, got ["模型"]"""),
        (
            {"messages": [{"role": "user", "content": [weird]}]},
            '{"type": "weird", "text": "' + "中文" * 26 + "…",
        ),
    ]:
        path.write_text(json.dumps(record) + "\n", encoding="utf-8")
        with pytest.raises(InputError) as err:
            read_prompts(path)
        assert str(err.value).endswith(message)
    record = {
        "prompt_id": "a", "sample_index": 0, "prompt": "hi", "prompt_token_ids": [1], "completion": "x",
        "completion_token_ids": [2], "finish_reason": "length", "num_tokens": 1, "generator": "m",
        "sampling": {},
    }  # fmt: skip
    assert record_problem(record) is None
    problem = record_problem({**record, "completion": ["é\n" * 60]})
    assert problem == "'completion' must be a string, got " + '["' + "é\\n" * 25 + "é…"


def test_a_prompt_id_is_a_string_as_in_prompts_files(tiny_generator, tmp_path):
    assert Prompt(1, text="x").id == "1"  # a file's {"id": 1} is "1" too
    assert Prompt(np.int64(2), text="x").id == "2"
    sampling = SamplingParams(max_new_tokens=2)
    rollout(
        tiny_generator, [Prompt(7, text="Hi!")], tmp_path / "r.jsonl", n=1, sampling=sampling, progress=False
    )
    assert [r["prompt_id"] for r in read_rollouts(tmp_path / "r.jsonl")] == ["7"]  # reads back


@pytest.mark.parametrize(
    "args, message",
    [
        (dict(id=None, text="x"), "id must be a non-empty string or an integer, got None"),
        (dict(id=" ", text="x"), "id must be a non-empty string"),
        (dict(id=True, text="x"), "got True"),
        (dict(id="a", text=5), "its text must be a string, got int"),
        (dict(id="a", messages="hi"), "'messages' must be a non-empty list of {role, content}"),
        (dict(id="a", messages=[]), "'messages' must be a non-empty list"),
        (dict(id="a", messages=["hi"]), "'messages' must be a non-empty list"),
        (dict(id="a", messages=[{"role": "user", "content": 5}]), "the content a string or a list"),
    ],
)
def test_a_prompt_refuses_fields_of_the_wrong_kind(args, message):
    with pytest.raises(InputError, match=re.escape(message)):
        Prompt(**args)


def test_without_a_chat_template_a_conversation_is_refused_not_flattened():
    from lenvm.prompts import template_ids
    from lenvm.testing import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = None
    one = template_ids(tokenizer, Prompt("u", messages=[{"role": "user", "content": "Hi"}]))
    assert one == template_ids(tokenizer, Prompt("t", text="Hi"))  # one user message is its text
    talk = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    with pytest.raises(InputError, match="'c': the tokenizer has no chat template"):
        template_ids(tokenizer, Prompt("c", messages=talk))


def test_a_prompts_file_with_a_lone_surrogate_is_named_by_line(tmp_path, capsys):
    from lenvm.cli import main

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": "a", "prompt": "Hi"}\n{"id": "b", "prompt": "He\\ud800llo"}\n')
    assert main(["rollout", "--prompts", str(prompts), "--out", str(tmp_path / "r.jsonl")]) == 2
    assert "p.jsonl:2: its text holds U+D800" in capsys.readouterr().err
    # In a rollout record too, named by file and line (training blamed the tokenizer).
    good = {"prompt_id": "a", "sample_index": 0, "prompt": "Hi", "prompt_token_ids": [1], "completion": "x",
            "completion_token_ids": [5], "finish_reason": "length", "num_tokens": 1, "generator": "g",
            "sampling": {}}  # fmt: skip
    rollouts = tmp_path / "r.jsonl"
    rollouts.write_text(json.dumps(good) + "\n" + json.dumps({**good, "prompt": "He\ud800llo"}) + "\n")
    with pytest.raises(InputError, match="r.jsonl:2: bad rollout record: its text holds U\\+D800"):
        read_rollouts(rollouts)


def test_openai_prompt_text_is_what_our_engine_encodes(tiny_generator):
    """Messages whose content is a list of text parts go to a server as the text the engine
    templates (they crashed the openai backend)."""
    from lenvm.rollouts import _prompt_text

    tok = tiny_generator[1]
    parts = [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]
    prompt = Prompt("p", messages=[{"role": "user", "content": parts}])
    text, templated = _prompt_text(tok, prompt)
    assert templated and tok(text, add_special_tokens=False)["input_ids"] == encode_prompt(tok, prompt)


# -- chat template arguments -------------------------------------------------------------------

NO_THINKING = {"enable_thinking": False}


def test_template_arguments_reach_the_chat_template(tiny_generator):
    """The tiny template writes an empty thinking block when enable_thinking is false, as Qwen3's."""
    tok = tiny_generator[1]
    plain = encode_prompt(tok, Prompt("a", text="Name a colour."))
    off = encode_prompt(tok, Prompt("a", text="Name a colour.", chat_template_kwargs=NO_THINKING))
    on = encode_prompt(
        tok, Prompt("a", text="Name a colour.", chat_template_kwargs={"enable_thinking": True})
    )
    assert off != plain and tok.decode(off).endswith("<think>\n\n</think>\n\n")
    assert on == plain  # a variable the template reads as it defaults changes nothing
    unread = encode_prompt(tok, Prompt("a", text="Name a colour.", chat_template_kwargs={"today": "Monday"}))
    assert unread == plain  # one it does not read is passed and ignored, as in vLLM


def test_template_arguments_without_a_chat_template_are_refused():
    from lenvm.prompts import template_ids
    from lenvm.testing import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = None
    with pytest.raises(
        InputError, match="'a' gives chat_template_kwargs \\(enable_thinking\\), but the tokenizer"
    ):
        template_ids(tokenizer, Prompt("a", text="Hi", chat_template_kwargs=NO_THINKING))


def test_a_prompts_file_carries_template_arguments(tmp_path):
    from lenvm.prompts import read_prompts

    path = tmp_path / "p.jsonl"
    path.write_text(
        '{"id": "a", "prompt": "Hi", "chat_template_kwargs": {"enable_thinking": false}, "src": "x"}\n'
    )
    [prompt] = read_prompts(path)
    assert prompt.chat_template_kwargs == NO_THINKING and prompt.extra == {"src": "x"}  # not meta
    path.write_text('{"id": "a", "prompt": "Hi", "chat_template_kwargs": null}\n')
    assert read_prompts(path) == [Prompt("a", text="Hi")]  # null is none, as in rollout records
    for bad, message in [
        ("[1]", "p.jsonl:1: 'chat_template_kwargs' must be an object of template variables, got list"),
        ("false", "must be an object of template variables, got bool"),
        ('{"tokenize": true}', "cannot set 'tokenize': it is an argument of apply_chat_template itself"),
        ('{"add_generation_prompt": false}', "cannot set 'add_generation_prompt'"),
    ]:
        path.write_text(f'{{"prompt": "Hi", "chat_template_kwargs": {bad}}}\n')
        with pytest.raises(InputError, match=re.escape(message)):
            read_prompts(path)
    with pytest.raises(InputError, match="must hold JSON values"):
        Prompt("a", text="Hi", chat_template_kwargs={"when": object()})  # records could not keep it


def test_rollout_records_keep_template_arguments_and_resume_tells_them_apart(tiny_generator, tmp_path):
    from lenvm.rollouts import record_prompt

    tok = tiny_generator[1]
    out = tmp_path / "r.jsonl"
    sampling = SamplingParams(max_new_tokens=3)
    prompt = Prompt("a", text="Name a colour.", chat_template_kwargs=NO_THINKING)
    rollout(tiny_generator, [prompt], out, n=1, sampling=sampling, progress=False)
    [record] = read_rollouts(out)
    assert record["chat_template_kwargs"] == NO_THINKING and "meta" not in record
    assert record["prompt_token_ids"] == encode_prompt(tok, prompt)
    assert record_prompt(record) == prompt
    # the same text without the arguments is another prompt, under its id or another
    with pytest.raises(InputError, match="prompt id 'a' names a different prompt"):
        rollout(
            tiny_generator, [Prompt("a", text="Name a colour.")], out, n=1, sampling=sampling, progress=False
        )
    with pytest.raises(InputError, match="holds prompt 'b' under another id, 'a'"):
        rollout(tiny_generator, [replace(prompt, id="b")], out, n=1, sampling=sampling, progress=False)
    other = [Prompt("b", text="Name a colour.")]
    assert (
        rollout(tiny_generator, other, out, n=1, sampling=sampling, progress=False).completions_written == 1
    )
    assert "chat_template_kwargs" not in read_rollouts(out)[1]  # a prompt without them writes none
    assert "chat_template_kwargs" in record_problem({**record, "chat_template_kwargs": [1]})
    # arguments compare as JSON: 0 is not false, though Python takes them as equal
    zero = replace(prompt, chat_template_kwargs={"enable_thinking": 0})
    with pytest.raises(InputError, match="prompt id 'a' names a different prompt"):
        rollout(tiny_generator, [zero], out, n=1, sampling=sampling, progress=False)


def test_the_openai_backend_templates_with_the_prompts_arguments(tiny_generator):
    from lenvm.rollouts import _prompt_text

    tok = tiny_generator[1]
    prompt = Prompt("a", text="Name a colour.", chat_template_kwargs=NO_THINKING)
    text, templated = _prompt_text(tok, prompt)
    assert templated and tok(text, add_special_tokens=False)["input_ids"] == encode_prompt(tok, prompt)
