"""Decoding speed: tokens per second of plain and LenVM-guided decoding, against ``generate``.

Every row runs in one process on the same prompts and generator, and every request generates
exactly ``new_tokens`` tokens (EOS disabled), so all methods do the same amount of work:

- ``generate``: transformers ``model.generate``, plain sampling (temperature 1, no truncation)
  on left-padded chat prompts;
- ``plain``: the lenvm engine without a LenVM;
- guided, under a tilt control (beta 1; with EOS disabled every control runs the full length)
  with ``k`` candidates a step: ``attached`` (the candidate block is the generator's own forward:
  one forward a step), ``standalone`` (a LenVM with its own copy of the generator's backbone:
  its block forward plus the generator's single-token forward), ``q`` (a Q-head scores the
  candidates from the current hidden state: one single-token forward) and ``naive`` (the attached
  LenVM scoring each candidate with its own single-token forward, then the chosen token once
  more: k + 1 forwards, the floor that exact block scoring has to beat);
- ``processor``: ``generate`` with :class:`lenvm.decoding.LenVMLogitsProcessor` and an attached
  LenVM, which runs its own candidate-block forward over the generator's body beside
  ``generate``'s step (compared with ``generate``);
- ``vllm`` and ``vllm-guided``: vLLM plain, and with the LenVM's vLLM logits processor (an
  attached LenVM, run like the processor above), in this process (measured on request only:
  they need the ``[vllm]`` extra; ``vllm-guided`` is compared with ``vllm``).

Timing does not depend on head weights: unless a trained LenVM is given (it serves its own
kind), the LenVMs are fresh, untrained heads on the generator. Each row is timed after a short
untimed warm-up call of the same batch shape. Peak memory is CUDA's peak allocated memory on a GPU,
and on CPU the peak resident set size of the whole process (every loaded model included),
sampled during the timed calls.
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import torch
from tqdm.auto import tqdm

from lenvm.bench.common import (
    WARMUP_TOKENS,
    Models,
    Run,
    load_models,
    markdown_table,
    positive_counts,
)
from lenvm.cli import options
from lenvm.decoding import Control, Engine, LenVMLogitsProcessor, Request, SamplingParams
from lenvm.figures import subplots
from lenvm.hub import default_device, eos_token_ids, torch_dtype
from lenvm.io import InputError, positive_count
from lenvm.model import Kind, LengthValueModel, generator_for, read_config
from lenvm.prompts import encode_prompt

DEFAULT_PROMPTS = (
    "Write a short poem about the sea.",
    "Explain why the sky is blue.",
    "Give me three tips for learning a new language.",
    "What is the difference between a list and a tuple in Python?",
    "Summarize the plot of Romeo and Juliet.",
    "How do I make a cup of green tea?",
    "Describe a busy train station at rush hour.",
    "What are the main causes of inflation?",
)
# method -> (LenVM kind, candidate scoring)
GUIDED: dict[str, tuple[Kind, Literal["block", "naive"]]] = {
    "attached": ("attached", "block"),
    "standalone": ("standalone", "block"),
    "q": ("q", "block"),
    "naive": ("attached", "naive"),
}
# Methods that run in another framework's loop, and the plain method of that loop.
REFERENCE = {"processor": "generate", "vllm-guided": "vllm"}
METHODS = ("generate", "plain", *GUIDED, "processor", "vllm", "vllm-guided")
VLLM_METHODS = ("vllm", "vllm-guided")
CONTROL = Control("tilt", beta=1.0)
FRESH = "fresh head"
STATM = "/proc/self/statm"
RSS_INTERVAL_S = 0.005


@dataclass(frozen=True)
class _Row:
    method: str
    batch: int
    k: int | None = None

    @property
    def key(self) -> str:
        k = "" if self.k is None else f"-k{self.k}"
        return f"{self.method}{k}-b{self.batch}"


def run_speed(
    out: str | os.PathLike,
    *,
    model: str | os.PathLike | None = None,
    batch_sizes: Sequence[int] = (1, 8),
    candidates: Sequence[int] = (8, 16),
    new_tokens: int = 128,
    generate_batch_sizes: Sequence[int] = (8, 16),
    prompts: Sequence[str] | None = None,
    repeats: int = 1,
    device: str | None = None,
    dtype: str = "float32",
    lenvm: str | os.PathLike | None = None,
    methods: Sequence[str] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Tokens/s, speed relative to plain sampling and peak memory of every decoding method;
    writes ``results.json``, ``table.md`` and ``speed.png`` to ``out`` (see the module doc).

    ``generate`` and ``plain`` run at every size in ``batch_sizes`` and ``generate_batch_sizes``;
    the guided methods at every size in ``batch_sizes`` with every candidate count in
    ``candidates``. A batch of size ``b`` is ``b`` requests of ``new_tokens`` tokens each, on
    ``prompts`` (default: a built-in list) cycled to fill it; ``repeats`` timed calls follow one
    warm-up call. ``lenvm``: a trained LenVM folder used for its own kind (the other kinds get
    fresh heads). ``methods`` picks among ``generate``, ``plain`` (always measured: the
    reference), the guided ones, ``processor``, ``vllm`` and ``vllm-guided`` (default: all but
    the vLLM ones; a method in another framework's loop brings that loop's plain method along).
    Rows already measured in ``out`` are not measured again.
    """
    started = time.perf_counter()
    batch_sizes = positive_counts(batch_sizes, "the batch sizes")
    generate_batch_sizes = positive_counts(generate_batch_sizes, "the generate batch sizes")
    candidates = positive_counts(candidates, "the candidate counts")
    if any(k < 2 for k in candidates):
        raise InputError(
            f"candidate counts must be at least 2 (a control chooses among them), got {candidates}"
        )
    if not batch_sizes and not generate_batch_sizes:
        raise InputError("no batch size to measure")
    new_tokens, repeats = positive_count(new_tokens, "new_tokens"), positive_count(repeats, "repeats")
    torch_dtype(dtype)  # an unknown name fails here, before anything runs
    prompts = _check_prompts(prompts)
    heads = {kind: FRESH for kind, _ in GUIDED.values()}
    if lenvm is not None:
        heads[read_config(lenvm).kind] = str(lenvm)

    default = [m for m in METHODS if m not in VLLM_METHODS]
    chosen = set(default if methods is None else (*methods, "plain"))
    if chosen - set(METHODS):
        raise InputError(f"unknown methods {sorted(chosen - set(METHODS))}; known: {', '.join(METHODS)}")
    chosen |= {REFERENCE[m] for m in chosen if m in REFERENCE}
    rows = [row for row in _plan(batch_sizes, candidates, generate_batch_sizes) if row.method in chosen]
    # What every row depends on; the sizes and candidate counts are in the row keys, so a rerun
    # with more of them measures only the new rows.
    model = generator_for(model, lenvm)
    settings = {
        "benchmark": "speed",
        "model": str(model),
        "lenvm": str(lenvm) if lenvm is not None else None,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "prompts": prompts,
        "device": str(default_device(device)),
        "dtype": dtype,
        "control": f"tilt beta={CONTROL.beta:g}",
    }
    with Run(out, settings) as run:
        todo = [row for row in rows if row.key not in run.done]
        with tqdm(
            total=len(rows), initial=len(rows) - len(todo), desc="speed", unit="row", disable=not progress
        ) as bar:
            if todo:
                models = load_models(model, lenvm, device, dtype)
                bench = _Bench(models, prompts, new_tokens, repeats, dtype, max(r.batch for r in rows))
                for row in todo:
                    bar.set_postfix_str(row.key)
                    run.add([{**bench.measure(row), "lenvm": _head(row, heads)}])
                    bar.update()
        measured = _summarize([run.done[row.key] for row in rows])
        results = {
            "benchmark": "speed",
            "settings": settings,
            "machines": sorted({r["machine"] for r in measured["rows"]}),
            "lenvm_heads": heads,
            **measured,
            "seconds_this_run": round(time.perf_counter() - started, 1),
        }
        run.write_json("results.json", results)
        run.write_text("table.md", _markdown(results))
        _plot(run, measured["rows"])
    return results


def _summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Rows with tokens/s and the ratio to plain at the same batch size, and plain/generate per
    batch size."""
    speed = {(r["method"], r["k"], r["batch"]): r["tokens"] / r["seconds"] for r in records}

    def ratio(r, reference):
        return speed[r["method"], r["k"], r["batch"]] / speed[reference, None, r["batch"]]

    rows = [
        {
            **r,
            "tokens_per_s": speed[r["method"], r["k"], r["batch"]],
            "x_plain": ratio(r, "plain"),
            "x_own_plain": ratio(r, REFERENCE.get(r["method"], "plain")),
        }
        for r in records
    ]
    batches = sorted({b for method, _, b in speed if method == "generate"})
    ratios = {str(b): speed["plain", None, b] / speed["generate", None, b] for b in batches}
    return {"rows": rows, "plain_vs_generate": ratios}


def _plan(batch_sizes: Sequence[int], candidates: Sequence[int], generate_sizes: Sequence[int]) -> list[_Row]:
    rows = []
    for b in sorted({*batch_sizes, *generate_sizes}):
        rows += [_Row("generate", b), _Row("plain", b)]
        if b in batch_sizes:
            rows += [_Row(method, b, k) for k in candidates for method in (*GUIDED, "processor")]
            rows += [_Row("vllm", b)] + [_Row("vllm-guided", b, k) for k in candidates]
    return rows


def _head(row: _Row, heads: dict[Kind, str]) -> str | None:
    if row.method in ("processor", "vllm-guided"):
        return heads["attached"]
    return heads[GUIDED[row.method][0]] if row.method in GUIDED else None


class _Bench:
    """Times rows on loaded models; builds each LenVM kind when a row first needs it."""

    def __init__(
        self, models: Models, prompts: list[str], new_tokens: int, repeats: int, dtype: str, max_batch: int
    ):
        if not all(models.fits(p, new_tokens) for p in prompts):
            raise InputError(f"a prompt plus {new_tokens} new tokens exceeds the generator's context")
        self.models = models
        self.max_batch = max_batch
        self.vllm_engines: dict[int | None, Any] = {}
        self.prompts = prompts
        self.new_tokens = new_tokens
        self.repeats = repeats
        self.dtype = torch_dtype(dtype)
        self.device = models.generator.device
        self.lenvms: dict[str, LengthValueModel] = {}
        if models.lenvm is not None:
            self.lenvms[models.lenvm.config.kind] = self._ready(models.lenvm)

    def measure(self, row: _Row) -> dict[str, Any]:
        build = {"generate": self._generate, "processor": self._generate}.get(row.method, self._engine)
        build = self._vllm if row.method in VLLM_METHODS else build
        # A short untimed call of the same shape first: one-off costs (allocations, kernel
        # selection, lazy imports) stay out of the timing without doubling the run.
        build(row, min(WARMUP_TOKENS, self.new_tokens))()
        call = build(row, self.new_tokens)
        tokens, seconds, peak = _timed(call, self.repeats, self.device)
        return {
            "key": row.key,
            "method": row.method,
            "k": row.k,
            "batch": row.batch,
            "tokens": tokens,
            "seconds": seconds,
            "peak_mib": peak,
            "machine": _machine(self.device),
        }

    def _lenvm(self, kind: Kind) -> LengthValueModel:
        if kind not in self.lenvms:
            generator = (self.models.generator, self.models.tokenizer)
            fresh = LengthValueModel.from_base(
                self.models.name, kind=kind, generator=generator, dtype=self.dtype, device=self.device
            )
            self.lenvms[kind] = self._ready(fresh)
        return self.lenvms[kind]

    def _ready(self, lenvm: LengthValueModel) -> LengthValueModel:
        # The head runs in the generator's dtype, as in a half-precision deployment.
        lenvm.head.to(self.dtype)
        return lenvm.eval()

    def _batch_prompts(self, batch: int) -> list[str]:
        return [self.prompts[i % len(self.prompts)] for i in range(batch)]

    def _engine(self, row: _Row, new_tokens: int) -> Callable[[], int]:
        lenvm, control = None, None
        scoring: Literal["block", "naive"] = "block"
        if row.method in GUIDED:
            kind, scoring = GUIDED[row.method]
            lenvm, control = self._lenvm(kind), CONTROL
        m = self.models
        k: dict[str, Any] = {"num_candidates": row.k} if row.k else {}  # a plain row has no candidates
        engine = Engine(m.generator, m.tokenizer, lenvm, candidate_scoring=scoring, **k)
        requests = [
            Request(p, SamplingParams(max_new_tokens=new_tokens, seed=i, ignore_eos=True), control=control)
            for i, p in enumerate(self._batch_prompts(row.batch))
        ]

        def call() -> int:
            return sum(len(r.token_ids) for r in engine.generate(requests, batch_size=row.batch))

        return call

    def _generate(self, row: _Row, new_tokens: int) -> Callable[[], int]:
        from transformers import GenerationConfig

        batch = row.batch
        model, tokenizer = self.models.generator, self.models.tokenizer
        encoded = [encode_prompt(tokenizer, p) for p in self._batch_prompts(batch)]
        width = max(len(e) for e in encoded)
        pad = tokenizer.pad_token_id
        eos = eos_token_ids(model, tokenizer)
        ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded], device=self.device)
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=self.device)
        # Plain sampling, set explicitly so that no default of the model's own config applies;
        # min_new_tokens keeps EOS out, as ignore_eos does in the engine.
        config = GenerationConfig(
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            repetition_penalty=1.0,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=pad,
            eos_token_id=eos,
        )

        processors = []
        if row.method == "processor":
            # A processor row carries its candidate count (see the rows run_speed lists).
            processor = LenVMLogitsProcessor(
                self._lenvm("attached"), CONTROL, num_candidates=cast(int, row.k)
            )
            processors = [processor]

        def call() -> int:
            with torch.inference_mode():
                out = model.generate(
                    input_ids=ids, attention_mask=mask, generation_config=config, logits_processor=processors
                )
            # Tokens up to each row's first EOS: generate pads a row that has ended.
            ended = torch.isin(out[:, width:], torch.tensor(eos, device=out.device)).int()
            return int((ended.cumsum(1) - ended == 0).sum())

        return call

    def _vllm(self, row: _Row, new_tokens: int) -> Callable[[], int]:
        guided = row.method == "vllm-guided"
        engine = self._vllm_engine(row.k if guided else None)
        requests = [
            Request(
                p,
                SamplingParams(max_new_tokens=new_tokens, seed=i, ignore_eos=True),
                control=CONTROL if guided else None,
            )
            for i, p in enumerate(self._batch_prompts(row.batch))
        ]
        return lambda: sum(len(r.token_ids) for r in engine.generate(requests))

    def _vllm_engine(self, k: int | None):
        """vLLM in this process, with the LenVM's processor for ``k`` candidates (None: plain);
        one engine per ``k``, kept for the rows after."""
        if k not in self.vllm_engines:
            from lenvm.integrations.vllm import VLLMEngine

            lenvm = None
            if k is not None:
                lenvm = self._lenvm_folder()
            self.vllm_engines[k] = VLLMEngine(
                self.models.name,
                lenvm=lenvm,
                **({"num_candidates": k} if k else {}),
                dtype=str(self.dtype).removeprefix("torch."),
                logprobs=False,
                max_num_seqs=self.max_batch,
            )
        return self.vllm_engines[k]

    def _lenvm_folder(self) -> str:
        """A folder of the attached LenVM that vLLM's processor loads."""
        if self.models.lenvm is not None and self.models.lenvm.config.kind == "attached":
            return str(self.models.lenvm_name)
        if not hasattr(self, "_fresh"):
            self._fresh = tempfile.TemporaryDirectory(prefix="lenvm-speed-")
            self._lenvm("attached").save_pretrained(Path(self._fresh.name) / "attached")
        return str(Path(self._fresh.name) / "attached")


def _timed(call: Callable[[], int], repeats: int, device: torch.device) -> tuple[int, float, float]:
    """Tokens, wall seconds and peak memory (MiB) of ``repeats`` calls."""
    cuda = device.type == "cuda"
    with _PeakMemory(device) as peak:
        if cuda:
            torch.cuda.synchronize(device)  # time our kernels only, not queued earlier work
        start = time.perf_counter()
        tokens = sum(call() for _ in range(repeats))
        if cuda:
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    return tokens, seconds, peak.mib


class _PeakMemory:
    """Peak memory during a ``with`` block: CUDA's peak allocated memory, or on CPU the peak
    resident set size of this process, read from /proc by a background thread (without /proc,
    the process's lifetime peak from getrusage)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> _PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif os.path.exists(STATM):
            self._sample()
            self._thread = threading.Thread(target=self._watch, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._sample()
        else:
            import resource

            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            self.peak = rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, else KiB

    @property
    def mib(self) -> float:
        return self.peak / 2**20

    def _sample(self) -> None:
        with open(STATM) as f:
            pages = int(f.read().split()[1])
        self.peak = max(self.peak, pages * os.sysconf("SC_PAGE_SIZE"))

    def _watch(self) -> None:
        while not self._stop.wait(RSS_INTERVAL_S):
            self._sample()


def _machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {torch.get_num_threads()} torch threads"


def _markdown(results: dict[str, Any]) -> str:
    s = results["settings"]
    heads = results["lenvm_heads"]
    trained = [f"{kind} from `{source}`" for kind, source in heads.items() if source != FRESH]
    lenvms = "fresh, untrained heads (timing does not depend on head weights)"
    if trained:
        lenvms = ", ".join(trained) + "; the other kinds fresh heads"
    memory = "peak CUDA memory allocated" if "cuda" in s["device"] else "peak resident memory of the process"
    intro = (
        f"Decoding speed on {', '.join(results['machines'])} ({s['dtype']}): each request generates "
        f"{s['new_tokens']} tokens (EOS disabled); {s['repeats']} timed call(s) after a warm-up. "
        f"Guided rows: {s['control']} with k candidates; LenVMs: {lenvms}. "
        f"naive scores each candidate with its own forward. Memory: {memory}.\n\n"
    )
    rows = [
        [
            r["method"],
            r["k"] if r["k"] is not None else "",
            r["batch"],
            f"{r['tokens_per_s']:.1f}",
            f"{r['x_plain']:.2f}x",
            f"{r['x_own_plain']:.2f}x" if r["method"] in REFERENCE else "",
            f"{r['peak_mib']:.0f}",
        ]
        for r in results["rows"]
    ]
    own = "x own loop's plain (processor: generate; vllm-guided: vllm)"
    header = ["method", "k", "batch", "tokens/s", "x plain", own, "peak memory (MiB)"]
    table = intro + markdown_table(header, rows)
    ratios = ", ".join(f"batch {b}: {x:.2f}x" for b, x in results["plain_vs_generate"].items())
    return table + (f"\nPlain engine vs transformers generate: {ratios}.\n" if ratios else "")


def _plot(run: Run, rows: list[dict[str, Any]]) -> None:
    import matplotlib

    series = list(dict.fromkeys(_label(r) for r in rows))
    color = {name: matplotlib.colormaps["tab20"](i % 20) for i, name in enumerate(series)}
    batches = sorted({r["batch"] for r in rows})
    groups = {b: [r for r in rows if r["batch"] == b] for b in batches}
    width = 0.8 / max(len(g) for g in groups.values())
    fig, ax = subplots(figsize=(max(6.0, 0.25 * len(rows) + 2), 4))
    labelled = set()
    for j, b in enumerate(batches):
        # Bars centred on their batch size: the guided methods do not run at every size.
        for i, r in enumerate(groups[b]):
            name = _label(r)
            x = j + (i - (len(groups[b]) - 1) / 2) * width
            ax.bar(x, r["tokens_per_s"], width, color=color[name], label=None if name in labelled else name)
            labelled.add(name)
    ax.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
    ax.set_ylabel("tokens/s")
    ax.set_title("Decoding speed")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    run.save_figure(fig, "speed.png")


def _label(row: dict[str, Any]) -> str:
    return row["method"] if row["k"] is None else f"{row['method']} k={row['k']}"


def _check_prompts(prompts: str | Sequence[str] | None) -> list[str]:
    if prompts is None:
        return list(DEFAULT_PROMPTS)
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise InputError("prompts must be a non-empty list of non-empty strings")
    return prompts


# -- command line ---------------------------------------------------------------------------

TABLE = "table.md"


def add_arguments(p) -> None:
    p.add_argument("--lenvm", type=options.path, help="a trained LenVM folder, used for its own kind")
    p.add_argument(
        "--batch-sizes",
        type=options.positive_int,
        nargs="+",
        default=[1, 8],
        help="batch sizes of every method",
    )
    p.add_argument("--candidates", type=options.positive_int, nargs="+", default=[8, 16], help="k values")
    p.add_argument(
        "--new-tokens", type=options.positive_int, default=128, help="tokens per request (EOS disabled)"
    )
    p.add_argument(
        "--generate-batch-sizes",
        type=options.positive_int,
        nargs="+",
        default=[8, 16],
        help="more batch sizes at which only generate and plain run",
    )
    p.add_argument(
        "--methods", nargs="+", choices=METHODS, help="default: all (plain always runs: the reference)"
    )


def main(args) -> None:
    run_speed(
        args.out,
        model=args.model,
        lenvm=args.lenvm,
        batch_sizes=args.batch_sizes,
        candidates=args.candidates,
        new_tokens=args.new_tokens,
        generate_batch_sizes=args.generate_batch_sizes,
        methods=args.methods,
        device=args.device,
        dtype=args.dtype,
        progress=args.progress,
    )
    parent = Path(args.out).parent
    if (parent / "summary.json").is_file():
        from lenvm.bench.report import write_report

        write_report(parent)  # a speed section joins a bench-all report
