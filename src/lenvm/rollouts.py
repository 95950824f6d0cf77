"""Rollouts: sample completions from a generator with its real decoding policy, as JSONL.

One record per completion (see :func:`read_rollouts`), written append-only so that an
interrupted run loses at most the batch in flight. Re-running with the same output file
generates only the sample indices still missing.

Three backends: ``hf`` (or ``engine``, as the benchmarks name it) runs a local Hugging Face
causal LM (or a vision-language model of the Qwen2-VL family) in our decoding engine; ``vllm``
runs it in vLLM, in this process (``pip install -e ".[vllm]"``); ``openai`` asks any
OpenAI-compatible server (vLLM, SGLang) through its ``/completions`` endpoint. ``auto`` (what the
demo and the benchmarks use) takes vLLM where it is installed, since it samples faster than our
engine (docs/benchmarks.md), and our engine otherwise; a file being resumed keeps the backend it
was started with. Prompts with images
need ``hf``; their records keep the image references (absolute paths or URLs, see
:mod:`lenvm.prompts`), never the pixels.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Generator, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, as_completed, wait
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from tqdm.auto import tqdm

from lenvm import hub
from lenvm._lazy import LazyModule
from lenvm.decoding.params import DEFAULT_MAX_NEW_TOKENS, RequestError, SamplingParams
from lenvm.io import (
    InputError,
    JsonlAppender,
    RunLock,
    check_writable,
    is_int,
    numbered_jsonl,
    positive_count,
    read_jsonl_to_append,
    refuse_renamed,
    replaceable,
)
from lenvm.prompts import (
    Messages,
    Prompt,
    as_prompt,
    encode_prompt,
    prompt_key,
    template_kwargs_problem,
    template_messages,
    unencodable,
)
from lenvm.quoting import quoted_json

if TYPE_CHECKING:
    import torch
else:  # imported when the hints are read: the vLLM and server backends run without it
    torch = LazyModule("torch")

# What ``import *`` binds: the stand-ins of the hints' modules above would shadow the caller's.
__all__ = [
    "AUTO",
    "BACKENDS",
    "BACKEND_OPTIONS",
    "ENGINE",
    "FINISH_REASONS",
    "REQUEST_TIMEOUT_S",
    "RolloutSummary",
    "SamplingParams",
    "ServerError",
    "TOKEN_ID_FIELDS",
    "derive_seed",
    "iter_rollouts",
    "read_rollouts",
    "record_problem",
    "record_prompt",
    "rollout",
    "vllm_installed",
]

BACKENDS = ("hf", "vllm", "openai")
AUTO = "auto"
TOKEN_ID_FIELDS = ("prompt_token_ids", "completion_token_ids")
ENGINE = "engine"  # what the benchmarks call our engine: another name for hf
FINISH_REASONS = ("stop", "length")
# Seconds one server request may take: n long completions on a busy server are slow.
REQUEST_TIMEOUT_S = 3600.0


@dataclass
class RolloutSummary:
    """What one :func:`rollout` call did: a resumed file's earlier calls are not counted (their
    records are in the file, their time is not). ``seconds_this_run`` counts generation only, not
    model loading."""

    path: Path
    prompts_total: int
    prompts_skipped: int
    completions_written: int
    tokens_generated: int
    finished: int
    truncated: int
    seconds_this_run: float
    tokens_per_second: float
    backend: str = "hf"

    def to_dict(self) -> dict[str, Any]:
        """As ``lenvm rollout`` prints it: rates and times to a tenth, as ``lenvm train`` does."""
        return {
            **asdict(self),
            "path": str(self.path),
            "seconds_this_run": round(self.seconds_this_run, 1),
            "tokens_per_second": round(self.tokens_per_second, 1),
        }


@dataclass
class _Job:
    """One completion to generate."""

    prompt: Prompt
    prompt_ids: list[int]
    sample_index: int
    seed: int


@dataclass
class _Done:
    """A generated completion, before it becomes a record."""

    job: _Job
    token_ids: list[int]
    finish_reason: str
    text: str
    extra: dict[str, Any] = field(default_factory=dict)


def derive_seed(seed: int, prompt_id: str, sample_index: int) -> int:
    """A 31-bit seed for one completion, stable across processes and platforms."""
    digest = hashlib.sha256(f"{seed}\x00{prompt_id}\x00{sample_index}".encode()).digest()
    return int.from_bytes(digest[:4], "big") >> 1


def _make_record(done: _Done, generator: str, sampling: dict[str, Any]) -> dict[str, Any]:
    """The rollout record of one completion (the schema :func:`read_rollouts` checks)."""
    prompt = done.job.prompt
    record = {
        "prompt_id": prompt.id,
        "sample_index": done.job.sample_index,
        **prompt.record_fields(),
        "prompt_token_ids": done.job.prompt_ids,
        "completion": done.text,
        "completion_token_ids": done.token_ids,
        "finish_reason": done.finish_reason,
        "num_tokens": len(done.token_ids),
        "generator": generator,
        "sampling": sampling,
        **done.extra,
    }
    if prompt.extra:
        record["meta"] = prompt.extra
    return record


def record_prompt(record: dict[str, Any]) -> Prompt:
    """The prompt a rollout record was sampled from: its id, text or messages, and template
    arguments."""
    prompt = as_prompt(record["prompt"], default_id=record["prompt_id"])
    return replace(prompt, chat_template_kwargs=record.get("chat_template_kwargs") or {})


def rollout(
    generator: str | os.PathLike | tuple,
    prompts: Sequence[str | Messages | dict[str, Any] | Prompt],
    out: str | os.PathLike,
    n: int = 4,
    sampling: SamplingParams | None = None,
    batch_size: int = 16,
    backend: str = "hf",
    base_url: str | None = None,
    api_model: str | None = None,
    api_key: str | None = None,
    tokenizer=None,
    progress: bool = True,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype = "float32",
    vllm_args: dict[str, Any] | None = None,
    loaded: tuple | None = None,
) -> RolloutSummary:
    """Sample ``n`` completions per prompt and append them to the JSONL file ``out``.

    ``generator`` is a model name, folder or built-in alias, or a loaded ``(model, tokenizer)``.
    For ``hf``, ``batch_size`` is the number of completions decoded at once, and a generator
    named here loads on ``device`` (default: the first accelerator, else the CPU) in ``dtype``,
    unless ``loaded`` gives it as ``(model, tokenizer)`` already; for ``vllm`` the most sequences
    vLLM runs at once (``vllm_args`` go to ``vllm.LLM``, e.g. ``{"max_model_len": 4096}``); for
    ``openai`` the number of requests in flight. Under ``vllm`` and ``openai``, ``tokenizer``
    (default: the generator's) applies the chat template and, for ``openai``, re-tokenizes; ``hf``
    decodes with the generator's own (pass ``(model, tokenizer)`` for another). ``auto``: see the
    module doc (a generator passed loaded, or prompts with images, stay in our engine).
    ``base_url``, ``api_model`` and ``api_key`` belong to ``openai``, ``vllm_args`` to ``vllm``
    (names ``vllm.LLM`` takes), ``tokenizer`` to both: given with another backend they are
    refused, not ignored.

    Every completion's seed derives from ``sampling.seed`` (:func:`derive_seed`), and a seed left
    as None is taken as 0, so that records can be reproduced and a file resumed: two calls with the
    same settings draw the same completions. For other samples of the same prompts, raise ``n``
    (the file grows by the new sample indices) or give another ``seed`` (into another file: a file
    holds one sampling policy, its seed included).
    """
    sampling = sampling if sampling is not None else SamplingParams()
    if not isinstance(sampling, SamplingParams):
        raise InputError(f"sampling must be a SamplingParams, got {type(sampling).__name__}")
    if sampling.ignore_eos:
        raise InputError("rollouts sample the generator's own lengths: ignore_eos must be off")
    seed = sampling.seed if sampling.seed is not None else 0  # resumable: every completion's derives from it
    sampling = replace(sampling, seed=seed)
    if sampling.max_new_tokens is None:  # part of the policy the records keep: one figure for all
        sampling = replace(sampling, max_new_tokens=DEFAULT_MAX_NEW_TOKENS)
    n = positive_count(n, "n (completions per prompt)")
    batch_size = positive_count(batch_size, "batch_size")  # a plain int, as vLLM's engine arguments take
    backend = "hf" if backend == ENGINE else backend
    if backend not in (*BACKENDS, AUTO):
        raise InputError(f"unknown backend {backend!r}; known: {', '.join((*BACKENDS, AUTO))}")
    if backend == "openai" and not base_url:
        raise InputError("the openai backend needs base_url (e.g. http://127.0.0.1:8000/v1)")
    if vllm_args is not None and not isinstance(vllm_args, dict):
        raise InputError(
            f"vllm_args must be a dict of vllm.LLM arguments by name, got {type(vllm_args).__name__}"
        )
    if isinstance(prompts, os.PathLike) or (isinstance(prompts, str) and os.path.isfile(prompts)):
        raise InputError(
            f"prompts must be a list of prompts, not the file {str(prompts)!r}: read it with "
            "lenvm.read_prompts(path)"
        )
    if isinstance(prompts, str | dict | Prompt):
        raise InputError("prompts must be a list of prompts: wrap a single one in a list")
    prompt_list = [as_prompt(p, default_id=str(i)) for i, p in enumerate(prompts)]
    if not prompt_list:
        raise InputError("no prompts to roll out")
    ids = [p.id for p in prompt_list]
    if len(set(ids)) != len(ids):
        raise InputError("prompt ids must be unique: resuming matches completions by prompt id")
    with_images = next((p.id for p in prompt_list if p.images), None)
    out = replaceable(out)  # a link's file, never a device
    check_writable(out)  # before the generator loads
    # Two runs appending to one file would each resume from what it held when they started.
    with RunLock(out, "writing rollouts into this file"):
        existing = read_jsonl_to_append(out, record_problem, "rollouts")
        if backend == AUTO:
            backend = _auto_backend(generator, existing, with_images is None, out)
        if backend == "vllm" and not vllm_installed():
            raise InputError("the vllm backend needs vLLM: install lenvm[vllm] (see the README)")
        if backend == "vllm" and isinstance(generator, tuple):
            raise InputError("the vllm backend loads the generator itself: pass its name or folder")
        given = {
            "base_url": base_url,
            "api_model": api_model,
            "api_key": api_key,
            "vllm_args": vllm_args,
            "tokenizer": tokenizer,
        }
        _check_backend_options(backend, [name for name, value in given.items() if value is not None])
        if with_images is not None and backend != "hf":
            raise InputError(
                f"prompt {with_images!r} has images: rollouts with images run in lenvm's engine (backend "
                f"'hf'); the {backend} backend here is text-only"
            )

        name = _generator_name(generator)
        record_sampling = {**sampling.policy(), "backend": backend}
        present = _check_resume(existing, prompt_list, name, record_sampling, out)
        missing = {p.id: [i for i in range(n) if i not in present.get(p.id, set())] for p in prompt_list}
        todo = [p for p in prompt_list if missing[p.id]]
        summary = RolloutSummary(
            out, len(prompt_list), len(prompt_list) - len(todo), 0, 0, 0, 0, 0.0, 0.0, backend
        )
        if not todo:
            return summary

        if backend == "hf":
            model, tokenizer = _load(loaded or generator, device, dtype)
        elif isinstance(generator, tuple):
            model, tokenizer = generator[0], tokenizer or generator[1]
            if tokenizer is None:
                raise InputError(
                    f"the loaded generator's tokenizer is None: pass it as (model, tokenizer) or as "
                    f"tokenizer= for the {backend} backend to template and tokenize with"
                )
            eos_ids = hub.eos_token_ids(model, tokenizer)
        else:
            tokenizer = tokenizer or hub.load_tokenizer(generator)
            eos_ids = hub.eos_token_ids_of(generator, tokenizer)
        # Every prompt is encoded (its images loaded) and every request checked before the output
        # file is touched, so bad input leaves nothing behind.
        encoded = {p.id: encode_prompt(tokenizer, p) for p in todo}
        jobs = [_Job(p, encoded[p.id], i, derive_seed(seed, p.id, i)) for p in todo for i in missing[p.id]]
        if backend == "vllm":  # started before the clock: loading is not generation
            from lenvm.integrations.vllm import VLLMEngine

            _check_vllm_args(vllm_args or {})
            engine_args = {"dtype": dtype, "max_num_seqs": batch_size, **(vllm_args or {})}
            vllm_engine = VLLMEngine(str(generator), logprobs=False, **engine_args)
        start = time.perf_counter()
        if backend == "hf":
            batches = _hf_batches(model, tokenizer, jobs, sampling, batch_size)
        elif backend == "vllm":
            batches = _vllm_batches(vllm_engine, jobs, sampling)
        else:
            key = api_key or os.environ.get("OPENAI_API_KEY")
            # The name the server was started with, as given (a folder's absolute path is the record's).
            served = str(generator) if not isinstance(generator, tuple) else name
            # base_url is set: the openai backend was refused without one above.
            server = _Server(cast(str, base_url), api_model or served, key)
            batches = _openai_batches(server, tokenizer, jobs, sampling, eos_ids, batch_size)

        bar = tqdm(total=len(jobs), unit="completion", desc="rollouts", disable=not progress)
        with JsonlAppender(out) as appender, bar:
            for batch in batches:
                appender.write([_make_record(d, name, record_sampling) for d in batch])
                for d in batch:
                    summary.completions_written += 1
                    summary.tokens_generated += len(d.token_ids)
                    if d.finish_reason == "stop":
                        summary.finished += 1
                    else:
                        summary.truncated += 1
                summary.seconds_this_run = time.perf_counter() - start
                summary.tokens_per_second = summary.tokens_generated / max(summary.seconds_this_run, 1e-9)
                bar.set_postfix_str(f"{summary.tokens_per_second:.1f} tok/s", refresh=False)
                bar.update(len(batch))  # redrawn at most every tenth of a second (TQDM_MININTERVAL)
        return summary


# The backends that take each of rollout's backend options; any other ignores it. (hf decodes
# with the generator's own tokenizer: pass the generator as (model, tokenizer) for another.)
BACKEND_OPTIONS = {
    "base_url": ("openai",),
    "api_model": ("openai",),
    "api_key": ("openai",),
    "vllm_args": ("vllm",),
    "tokenizer": ("vllm", "openai"),
}


def _check_backend_options(backend: str, given: list[str]) -> None:
    """Refuse options of other backends than ``backend`` (the one chosen, ``auto`` resolved):
    ignored, a ``base_url`` would let the local model answer in the server's place."""
    for name in given:
        owners = BACKEND_OPTIONS[name]
        if backend not in owners:
            hint = " (hf takes the generator as (model, tokenizer))" if name == "tokenizer" else ""
            raise InputError(
                f"{name} is an option of the {' and '.join(owners)} backend{'s' if len(owners) > 1 else ''}, "
                f"and this rollout runs on {backend}: choose backend {' or '.join(map(repr, owners))} or "
                f"leave {name} out{hint}"
            )


def _check_vllm_args(vllm_args: dict[str, Any]) -> None:
    """Refuse ``vllm_args`` that ``vllm.LLM`` does not take (they would end in a TypeError from
    inside vLLM), and ``model``: the generator is the model. Call after :mod:`lenvm.integrations.vllm` is
    imported, which sets vLLM's environment defaults before vLLM loads."""
    import dataclasses
    import inspect

    from vllm import LLM, EngineArgs

    if "model" in vllm_args:
        raise InputError("vllm_args cannot set 'model': vLLM loads the generator given to rollout")
    known = {f.name for f in dataclasses.fields(EngineArgs)} | set(inspect.signature(LLM).parameters)
    unknown = [name for name in vllm_args if name not in known - {"kwargs"}]
    if unknown:
        raise InputError(
            f"vllm_args: {', '.join(map(repr, unknown))} {'is' if len(unknown) == 1 else 'are'} not "
            "among vllm.LLM's arguments (see vllm.EngineArgs)"
        )


def vllm_installed() -> bool:
    """Whether vLLM can be imported here (without importing it)."""
    return importlib.util.find_spec("vllm") is not None


def _auto_backend(generator, existing: list[dict[str, Any]], text_only: bool, out: Path) -> str:
    """The backend ``auto`` stands for (see the module doc)."""
    if existing:
        chosen = existing[0]["sampling"].get("backend", "hf")
        if chosen == "openai":
            raise InputError(f"{out} was written through an OpenAI-compatible server: resume it with that")
        if chosen == "vllm" and not vllm_installed():
            raise InputError(
                f"{out} was started with the vllm backend, which is not installed here: install "
                "lenvm[vllm] to resume it, or use another output file"
            )
        return chosen
    named = not isinstance(generator, tuple)
    return "vllm" if named and text_only and vllm_installed() else "hf"


def _generator_name(generator) -> str:
    if isinstance(generator, tuple):
        if len(generator) != 2:
            raise InputError("a loaded generator must be a (model, tokenizer) pair")
        return hub.model_name(getattr(generator[0], "name_or_path", "") or type(generator[0]).__name__)
    return hub.model_name(generator)


def _load(generator, device: str | torch.device | None, dtype: str | torch.dtype):
    if isinstance(generator, tuple):
        from lenvm.vision import as_tokenizer

        return generator[0], as_tokenizer(generator[1])
    return hub.load_generator(generator, device=device, dtype=dtype)


def _check_resume(
    existing: list[dict[str, Any]],
    prompts: list[Prompt],
    name: str,
    sampling: dict[str, Any],
    out: Path,
) -> dict[str, set[int]]:
    """Sample indices already in the file per prompt id; refuse to mix policies or prompts."""
    by_id = {p.id: p for p in prompts}
    present: dict[str, set[int]] = {}
    # a prompt's key -> an id it has in the file, not among the prompts
    other_ids: dict[str, str] = {}
    for record in existing:
        if record["sampling"] != sampling:
            raise InputError(
                f"{out} was written with sampling {record['sampling']}, not {sampling}: "
                "resuming with different sampling parameters would mix two policies; "
                "use another output file"
            )
        if hub.model_name(record["generator"]) != name:
            raise InputError(
                f"{out} was written by generator {record['generator']!r}, not {name!r}; "
                "use another output file"
            )
        key = prompt_key(record)
        prompt = by_id.get(record["prompt_id"])
        if prompt is None:
            other_ids.setdefault(key, record["prompt_id"])
            continue
        if key != prompt.key():
            raise InputError(
                f"{out}: prompt id {prompt.id!r} names a different prompt in the file; "
                "use another output file"
            )
        samples = present.setdefault(prompt.id, set())
        if record["sample_index"] in samples:  # two runs wrote into one file at once, say
            raise InputError(
                f"{out} holds sample {record['sample_index']} of prompt {prompt.id!r} twice: it was written "
                "by two runs at once; keep one copy of each sample (or start another file)"
            )
        samples.add(record["sample_index"])
    for prompt in prompts:
        if prompt.id not in present:
            refuse_renamed(out, prompt.id, other_ids.get(prompt.key()))
    return present


# --- hf and vllm backends -----------------------------------------------------------------------------


def _hf_batches(model, tokenizer, jobs, sampling, batch_size):
    """Completions from the decoding engine (plain sampling), each yielded as soon as it ends.
    The engine refills a row as soon as its completion ends (``generate`` waits for the longest
    of a batch), and each completion draws from its own seeded random stream, so its sample does
    not depend on the batch it lands in (in reduced precision, a batch's rounding may still tip a
    near tie: see :mod:`lenvm.decoding.sequence`)."""
    from lenvm.decoding import Engine

    return _engine_batches(Engine(model, tokenizer), jobs, sampling, batch_size)


def _vllm_batches(engine, jobs, sampling):
    """Completions from vLLM in this process, each seeded on its own like the engine's; vLLM
    shuts down (its KV cache is freed) when the last one is out."""
    try:
        yield from _engine_batches(engine, jobs, sampling, None)
    finally:
        engine.close()


def _engine_batches(engine, jobs, sampling, batch_size):
    """One-completion batches from ``engine.stream``, which checks every request when called."""
    from lenvm.decoding import Request

    # Longest prompts first: memory runs out on the first batch rather than late in a run.
    jobs = sorted(jobs, key=lambda j: -len(j.prompt_ids))
    requests = [Request(job.prompt, replace(sampling, seed=job.seed)) for job in jobs]
    try:
        results = engine.stream(requests, batch_size=batch_size)
    except RequestError as err:  # named by the engine's request number: name the prompt instead
        raise InputError(f"prompt {jobs[err.key].prompt.id!r}: {err.reason}") from None
    return (
        [_Done(jobs[index], result.token_ids, result.finish_reason, result.text)] for index, result in results
    )


# --- openai backend -------------------------------------------------------------------------


class ServerError(InputError):
    """The OpenAI-compatible server could not be reached, refused a request or answered wrongly."""


@dataclass
class _Server:
    base_url: str
    model: str
    api_key: str | None

    def post(self, route: str, payload: dict[str, Any]) -> dict[str, Any]:
        url = self.base_url.rstrip("/") + route
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(url, json.dumps(payload).encode(), headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
                body = response.read()
        except urllib.error.HTTPError as err:
            detail = err.read().decode("utf-8", "replace").strip()[:500]
            raise ServerError(f"{url} answered HTTP {err.code}: {detail}") from None
        except (urllib.error.URLError, OSError, ValueError) as err:  # ValueError: not a URL
            raise ServerError(f"cannot reach {url}: {getattr(err, 'reason', err)}") from None
        try:
            answer = json.loads(body)
        except ValueError:  # not JSON, or not even text
            raise ServerError(
                f"{url} answered with something not JSON: {quoted_json(body.decode('utf-8', 'replace'), 200)}"
            ) from None
        if not isinstance(answer, dict) or not isinstance(answer.get("choices"), list):
            raise ServerError(f"{url} answered without a 'choices' list: {quoted_json(answer, 200)}")
        return answer


def _openai_batches(server: _Server, tokenizer, jobs, sampling, eos_ids, concurrency):
    """One request per completion, with its own seed (so that a sample is the same however a run
    is split or resumed, as with the other backends), ``concurrency`` in flight."""
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        pending = {
            pool.submit(_request_completion, server, tokenizer, job, sampling, eos_ids) for job in jobs
        }
        try:
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    yield future.result()
        except KeyboardInterrupt:
            # The pool waits for the requests in flight anyway: their answers are kept (written
            # by the caller) rather than dropped; those not yet sent are not sent.
            in_flight = [f for f in pending if not f.cancel()]
            pending = set()
            if in_flight:
                print(
                    f"interrupted: waiting for the {len(in_flight)} answers in flight, to keep them",
                    file=sys.stderr,
                )
            for future in as_completed(in_flight):
                if future.exception() is None:
                    yield future.result()
            raise
        finally:
            for future in pending:
                future.cancel()


def _request_completion(
    server: _Server, tokenizer, job: _Job, sampling: SamplingParams, eos_ids: list[int]
) -> list[_Done]:
    """One completion of ``job``'s prompt, drawn by the server with the job's seed (a batch of one)."""
    prompt_text, templated = _prompt_text(tokenizer, job.prompt)
    payload = {
        "model": server.model,
        "prompt": prompt_text,
        "n": 1,
        "max_tokens": sampling.max_new_tokens,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        # Sent even when off: servers otherwise fill them from the model's generation config.
        # -1 is the "off" value every vLLM version accepts (older ones reject 0).
        "top_k": sampling.top_k if sampling.top_k > 0 else -1,
        "min_p": sampling.min_p,
        "repetition_penalty": 1.0,
        "seed": job.seed,
        "logprobs": 1,
        "return_tokens_as_token_ids": True,
    }
    if templated:
        # The chat template already holds any BOS; the server must not add a second one.
        payload["add_special_tokens"] = False
    answer = server.post("/completions", payload)
    if len(answer["choices"]) != 1:
        raise ServerError(f"{server.base_url}: asked for 1 completion, got {len(answer['choices'])}")
    [choice] = answer["choices"]
    reason = choice.get("finish_reason")
    if reason not in FINISH_REASONS:
        raise ServerError(f"{server.base_url}: unexpected finish_reason {reason!r}")
    text = choice.get("text") or ""
    ids = _token_ids_from_logprobs(choice.get("logprobs"))
    extra = {}
    if ids is None:
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        extra["token_ids_source"] = "retokenized"
    if reason == "stop" and (not ids or ids[-1] not in eos_ids):
        ids.append(eos_ids[0])
    return [_Done(job, ids, reason, text, extra)]


def _prompt_text(tokenizer, prompt: Prompt) -> tuple[str, bool]:
    """The text whose tokenization is :func:`encode_prompt`'s ids; True if chat-templated."""
    messages = template_messages(prompt)  # text parts joined, as encode_prompt takes them
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False, **prompt.chat_template_kwargs
        )
        return text, True
    if prompt.text is not None:
        return prompt.text, False
    return "\n".join(m["content"] for m in messages), False


def _token_ids_from_logprobs(logprobs: Any) -> list[int] | None:
    """Ids from vLLM's ``return_tokens_as_token_ids`` ("token_id:123"), or None if absent."""
    tokens = logprobs.get("tokens") if isinstance(logprobs, dict) else None
    if not isinstance(tokens, list):
        return None
    ids = []
    for token in tokens:
        if not (isinstance(token, str) and token.startswith("token_id:")):
            return None
        try:
            ids.append(int(token[len("token_id:") :]))
        except ValueError:
            return None
    return ids


# --- reading --------------------------------------------------------------------------------


def read_rollouts(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read and check a rollouts file; a bad record raises :class:`InputError` naming its line."""
    return list(iter_rollouts(path))


def iter_rollouts(path: str | os.PathLike) -> Generator[dict[str, Any], None, None]:
    """The records of a rollouts JSONL file, or of a Hugging Face ``datasets`` folder (written by
    ``Dataset.save_to_disk``, needs the ``datasets`` extra), one at a time and checked.

    Nothing is kept: each call reads the file afresh, so a training run can stream a rollout set
    larger than memory.
    """
    path = Path(path)
    if path.is_dir():
        yield from _iter_dataset_folder(path)
        return
    for lineno, record in numbered_jsonl(path):
        problem = record_problem(record)
        if problem:
            raise InputError(f"{path}:{lineno}: bad rollout record: {problem}")
        yield record


def _iter_dataset_folder(path: Path) -> Iterator[dict[str, Any]]:
    try:
        import datasets
    except ImportError as err:
        if not (isinstance(err, ModuleNotFoundError) and err.name == "datasets"):
            # Installed, but it or what it imports is broken (a pyarrow that needs another numpy).
            raise InputError(
                f"the installed 'datasets' package fails to import ({type(err).__name__}: {err}); "
                "fix or reinstall it (pip install 'lenvm[datasets]')"
            ) from err
        raise InputError(
            f"{path} is a folder: reading a Hugging Face datasets folder needs the 'datasets' package "
            "(pip install 'lenvm[datasets]'); or give a rollouts JSONL file"
        ) from None
    try:
        data = datasets.load_from_disk(str(path))
    except FileNotFoundError as err:
        raise InputError(f"{path}: not a datasets folder written by save_to_disk ({err})") from None
    except TypeError as err:  # a format of a later datasets, read by older code
        raise InputError(
            f"{path}: the installed datasets {datasets.__version__} cannot read this folder ({err}); "
            "one written by a newer datasets needs that version or later"
        ) from err
    if isinstance(data, datasets.DatasetDict):
        raise InputError(f"{path} holds several splits ({', '.join(data)}); give the folder of one")
    for index, record in enumerate(data):  # Arrow-backed: rows are read from disk as iterated
        record = {k: v for k, v in record.items() if v is not None}  # absent optional fields
        problem = record_problem(record)
        if problem:
            raise InputError(f"{path}: row {index}: bad rollout record: {problem}")
        yield record


def _int_list(x: Any) -> bool:
    return isinstance(x, list) and all(is_int(i) for i in x)


def record_problem(record: Any) -> str | None:
    """What is wrong with one rollout record, or None if it fits the schema."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    checks = [
        ("prompt_id", lambda v: isinstance(v, str), "a string"),
        ("sample_index", lambda v: is_int(v) and v >= 0, "an integer >= 0"),
        ("prompt", lambda v: isinstance(v, str | list), "a string or a messages list"),
        ("prompt_token_ids", lambda v: _int_list(v) and len(v) > 0, "a non-empty list of ints"),
        ("completion", lambda v: isinstance(v, str), "a string"),
        ("completion_token_ids", _int_list, "a list of ints"),
        ("finish_reason", lambda v: v in FINISH_REASONS, "'stop' or 'length'"),
        ("num_tokens", is_int, "an integer"),
        ("generator", lambda v: isinstance(v, str), "a string"),
        ("sampling", lambda v: isinstance(v, dict), "an object"),
    ]
    for key, ok, expected in checks:
        if key not in record:
            return f"missing '{key}'"
        if not ok(record[key]):
            return f"'{key}' must be {expected}, got {quoted_json(record[key])}"
    kwargs = record.get("chat_template_kwargs")
    if kwargs is not None and (why := template_kwargs_problem(kwargs)) is not None:
        return why
    if record["num_tokens"] != len(record["completion_token_ids"]):
        return "'num_tokens' differs from the length of 'completion_token_ids'"
    if record["finish_reason"] == "stop" and not record["completion_token_ids"]:
        return "a completion that stopped must end with its EOS id, but it has no tokens"
    # The token id lists, checked above to hold ints only, are most of a record: left out of the
    # text check, which otherwise cost more than parsing the line.
    return unencodable({k: v for k, v in record.items() if k not in TOKEN_ID_FIELDS})
