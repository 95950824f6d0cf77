"""Serving load: requests/s, tokens/s, and first-token and whole-request latency (p50, p99) of
``lenvm serve`` at several numbers of concurrent clients, for plain and LenVM-guided requests.

The server runs in its own process, as deployed (``lenvm serve`` on a free port of 127.0.0.1),
unless ``--base-url`` names a running OpenAI-compatible server (``lenvm serve`` or ``vllm serve``
with lenvm's processor: the requests are the same). Each client sends its requests one after
the other (a closed loop), so ``c`` clients keep ``c`` requests in flight. A request is a
streaming text completion of a chat-templated prompt (as lenvm's rollouts send to a server)
that generates exactly ``new_tokens`` tokens (``ignore_eos``), so that plain and guided rows do
the same work; a guided request carries a tilt control (``length_tilt`` in ``vllm_xargs``),
which with EOS disabled runs every step guided. The first token's time is that of the first
chunk with a token. One untimed request per mode warms the server up.

The LenVM is a trained one when ``--lenvm`` is given, else a fresh, untrained attached head
saved into the results folder: timing does not depend on head weights.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

from tqdm.auto import tqdm

from lenvm.bench.common import Run, markdown_table, positive_counts
from lenvm.bench.speed import DEFAULT_PROMPTS
from lenvm.cli import options
from lenvm.event_loops import run_own_loop
from lenvm.figures import subplots
from lenvm.hub import load_tokenizer
from lenvm.io import InputError, is_real, positive_count
from lenvm.model import generator_for

MODES = ("plain", "guided")
START_TIMEOUT_S = 900.0  # loading a model on a busy CPU can take minutes
REQUEST_TIMEOUT_S = 1800.0
FRESH = "fresh attached head"


def run_serve_bench(
    out: str | os.PathLike,
    *,
    model: str | os.PathLike | None = None,
    lenvm: str | os.PathLike | None = None,
    base_url: str | None = None,
    api_key: str | None = None,
    concurrency: Sequence[int] = (1, 4, 16),
    modes: Sequence[str] = MODES,
    new_tokens: int = 64,
    requests_per_client: int = 4,
    batch_size: int = 16,
    num_candidates: int = 8,
    tilt: float = 1.0,
    device: str | None = None,
    dtype: str = "float32",
    progress: bool = True,
) -> dict[str, Any]:
    """Measure every (mode, clients) row not yet in ``out``; write ``results.json``, ``table.md``
    and ``serve.png`` there (see the module doc). A row of ``c`` clients sends
    ``c * requests_per_client`` requests."""
    started = time.perf_counter()
    concurrency = positive_counts(concurrency, "concurrency")
    if not concurrency:
        raise InputError("concurrency must name at least one number of clients")
    unknown = sorted(set(modes) - set(MODES))
    if unknown or not modes:
        raise InputError(f"modes must be among {', '.join(MODES)}, got {list(modes)}")
    new_tokens = positive_count(new_tokens, "new_tokens")
    requests_per_client = positive_count(requests_per_client, "requests_per_client")
    if not is_real(tilt):
        raise InputError(f"tilt must be a finite number, got {tilt!r}")
    out = Path(out)
    model = generator_for(model, lenvm)
    settings = {
        "benchmark": "serve",
        "model": str(model),
        "lenvm": str(lenvm) if lenvm is not None else (None if base_url else FRESH),
        "base_url": base_url,
        "new_tokens": new_tokens,
        "requests_per_client": requests_per_client,
        "batch_size": None if base_url else batch_size,
        "num_candidates": None if base_url else num_candidates,
        "control": f"length_tilt {tilt:g}",
        "prompts": list(DEFAULT_PROMPTS),
        "device": device,
        "dtype": dtype,
    }
    rows = [(mode, c) for mode in MODES if mode in modes for c in concurrency]
    with Run(out, settings) as run:
        todo = [(mode, c) for mode, c in rows if _key(mode, c) not in run.done]
        if todo:
            prompts = _templated(model)
            with _ServerProcess(
                out, model, lenvm, base_url, batch_size, num_candidates, device, dtype
            ) as url:
                load = _Load(url, api_key, prompts, new_tokens, tilt)
                bar = tqdm(total=len(rows), initial=len(rows) - len(todo), desc="serve", disable=not progress)
                warmed = set()
                for mode, clients in todo:
                    bar.set_postfix_str(_key(mode, clients))
                    if mode not in warmed:
                        load.run(mode, 1, 1)
                        warmed.add(mode)
                    measured = load.run(mode, clients, clients * requests_per_client)
                    run.add([{"key": _key(mode, clients), "mode": mode, "clients": clients, **measured}])
                    bar.update()
                bar.close()
        records = [run.done[_key(mode, c)] for mode, c in rows]
        results: dict[str, Any] = {
            "benchmark": "serve",
            "settings": settings,
            "machine": f"{os.cpu_count()} CPU cores" if device in (None, "cpu") else str(device),
            "rows": [{k: v for k, v in r.items() if k not in ("ttft", "latency")} for r in records],
            "seconds": round(time.perf_counter() - started, 1),
        }
        run.write_json("results.json", results)
        run.write_text("table.md", _markdown(results))
        _plot(run, results["rows"])
    return results


def _key(mode: str, clients: int) -> str:
    return f"{mode}-c{clients}"


def _templated(model) -> list[str]:
    """The prompts as the generator's chat template writes them: what a text completion sends."""
    tokenizer = load_tokenizer(model)
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False
        )
        if getattr(tokenizer, "chat_template", None)
        else p
        for p in DEFAULT_PROMPTS
    ]


class _ServerProcess:
    """``lenvm serve`` in its own process for the length of the run (or a given base URL)."""

    def __init__(self, out: Path, model, lenvm, base_url, batch_size, num_candidates, device, dtype):
        self.args = (out, model, lenvm, batch_size, num_candidates, device, dtype)
        self.base_url = base_url
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> str:
        if importlib.util.find_spec("httpx") is None:  # the load generator's client, and the server's
            raise InputError('lenvm bench serve needs the serving extra: pip install "lenvm[serve]"')
        if self.base_url:
            return self.base_url.rstrip("/").removesuffix("/v1")
        out, model, lenvm, batch_size, num_candidates, device, dtype = self.args
        if lenvm is None:
            lenvm = out / "fresh-head"
            if not (lenvm / "config.json").is_file():
                from lenvm.model import LengthValueModel

                LengthValueModel.from_base(
                    model, kind="attached", device=device, dtype=dtype
                ).save_pretrained(lenvm)
        port = _free_port()
        command = [
            sys.executable, "-m", "lenvm.cli", "serve", "--model", str(model), "--lenvm", str(lenvm),
            "--port", str(port), "--batch-size", str(batch_size), "--num-candidates", str(num_candidates),
            "--max-queue", "1024", "--max-streams", "1024", "--dtype", dtype, "--log-level", "warning",
        ]  # fmt: skip
        if device:
            command += ["--device", device]
        self.log = (out / "server.log").open("w")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_healthy(url, self.process, out / "server.log")
        except BaseException:  # Ctrl-C or a server that never came up: it goes too
            self.__exit__()
            raise
        return url

    def __exit__(self, *exc) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, process: subprocess.Popen, log: Path) -> None:
    import httpx

    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise InputError(f"the server exited with status {process.returncode}; see {log}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise InputError(f"the server did not become healthy within {START_TIMEOUT_S:.0f} s; see {log}")


class _Load:
    """Closed-loop clients over HTTP, streaming, timing each request."""

    def __init__(self, url: str, api_key: str | None, prompts: list[str], new_tokens: int, tilt: float):
        self.url = url
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.prompts = prompts
        self.new_tokens = new_tokens
        self.tilt = tilt
        self.model: str | None = None
        self.measuring: tuple[asyncio.AbstractEventLoop, asyncio.Task] | None = None

    def run(self, mode: str, clients: int, total: int) -> dict[str, Any]:
        """``total`` requests of ``mode`` sent by ``clients`` clients, timed, on an event loop of
        their own: also from a thread that runs one (a notebook's, see :func:`run_own_loop`)."""
        return run_own_loop(lambda: asyncio.run(self._measured(mode, clients, total)), self._cancel)

    def _cancel(self) -> None:
        """Cancel the measuring, from another thread (an interrupt's); a loop that has ended
        has nothing left to cancel."""
        if self.measuring is not None:
            loop, task = self.measuring
            with contextlib.suppress(RuntimeError):  # the loop has closed meanwhile
                loop.call_soon_threadsafe(task.cancel)

    async def _measured(self, mode: str, clients: int, total: int) -> dict[str, Any]:
        import httpx

        self.measuring = (asyncio.get_running_loop(), cast(asyncio.Task, asyncio.current_task()))
        limits = httpx.Limits(max_connections=clients + 1)
        async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S, headers=self.headers, limits=limits) as http:
            if self.model is None:
                models = (await http.get(self.url + "/v1/models")).raise_for_status().json()
                self.model = models["data"][0]["id"]
            queue = list(range(total))
            timings: list[tuple[float, float, int]] = []

            async def client() -> None:
                while queue:
                    timings.append(await self._one(http, mode, queue.pop(0)))

            start = time.perf_counter()
            await asyncio.gather(*[client() for _ in range(clients)])
            wall = time.perf_counter() - start
        ttft = sorted(t for t, _, _ in timings)
        latency = sorted(t for _, t, _ in timings)
        tokens = sum(n for _, _, n in timings)
        return {
            "requests": total,
            "tokens": tokens,
            "seconds": wall,
            "requests_per_s": total / wall,
            "tokens_per_s": tokens / wall,
            "ttft_p50": _percentile(ttft, 50),
            "ttft_p99": _percentile(ttft, 99),
            "latency_p50": _percentile(latency, 50),
            "latency_p99": _percentile(latency, 99),
            "ttft": ttft,
            "latency": latency,
        }

    async def _one(self, http, mode: str, index: int) -> tuple[float, float, int]:
        body: dict[str, Any] = {
            "model": self.model,
            "prompt": self.prompts[index % len(self.prompts)],
            "max_tokens": self.new_tokens,
            "ignore_eos": True,
            "seed": index,
            "stream": True,
            "stream_options": {"include_usage": True},
            "add_special_tokens": False,  # the chat template already holds any BOS
        }
        if mode == "guided":
            body["vllm_xargs"] = {"length_tilt": self.tilt}
        start = time.perf_counter()
        first = None
        tokens = 0
        async with http.stream("POST", self.url + "/v1/completions", json=body) as response:
            if response.status_code != 200:
                detail = (await response.aread()).decode("utf-8", "replace")[:300]
                raise RuntimeError(f"{self.url} answered HTTP {response.status_code}: {detail}")
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise RuntimeError(f"{self.url}: {chunk['error']}")
                if chunk.get("choices") and first is None:
                    first = time.perf_counter() - start
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
        return (
            first if first is not None else time.perf_counter() - start,
            time.perf_counter() - start,
            tokens,
        )


def _percentile(values: list[float], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default)."""
    import numpy as np

    return float(np.percentile(values, q))


def _markdown(results: dict[str, Any]) -> str:
    s = results["settings"]
    server = (
        f"`{s['base_url']}`"
        if s["base_url"]
        else (f"`lenvm serve` (batch {s['batch_size']}, {s['num_candidates']} candidates a guided step)")
    )
    lenvm = s["lenvm"] or "the server's"
    if lenvm == FRESH:
        lenvm = "a fresh, untrained attached head (timing does not depend on head weights)"
    intro = (
        f"Serving {s['model']} with {server} on {results['machine']}: each client sends "
        f"{s['requests_per_client']} streaming completions one after the other, each of exactly "
        f"{s['new_tokens']} tokens (EOS ignored); guided requests: {s['control']}, LenVM: {lenvm}. "
        "Latencies in seconds: first token (TTFT) and whole request.\n\n"
    )
    header = ["mode", "clients", "requests", "requests/s", "tokens/s", "TTFT p50", "TTFT p99", "latency p50",
              "latency p99"]  # fmt: skip
    rows = [
        [
            r["mode"],
            r["clients"],
            r["requests"],
            f"{r['requests_per_s']:.2f}",
            f"{r['tokens_per_s']:.1f}",
            f"{r['ttft_p50']:.2f}",
            f"{r['ttft_p99']:.2f}",
            f"{r['latency_p50']:.2f}",
            f"{r['latency_p99']:.2f}",
        ]
        for r in results["rows"]
    ]
    return intro + markdown_table(header, rows)


def _plot(run: Run, rows: list[dict[str, Any]]) -> None:
    fig, (speed, latency) = subplots(1, 2, figsize=(9, 3.5))
    for k, mode in enumerate(MODES):
        mine = [r for r in rows if r["mode"] == mode]
        if not mine:
            continue
        clients = [r["clients"] for r in mine]
        colour = f"C{k}"  # a mode has one colour in both panels
        speed.plot(clients, [r["tokens_per_s"] for r in mine], marker="o", label=mode, color=colour)
        latency.plot(clients, [r["latency_p50"] for r in mine], marker="o", label=f"{mode} p50", color=colour)
        latency.plot(
            clients, [r["latency_p99"] for r in mine], marker="x", linestyle="--", label=f"{mode} p99",
            color=colour,
        )  # fmt: skip
    ticks = sorted({r["clients"] for r in rows})
    for ax, label in ((speed, "tokens/s"), (latency, "request latency (s)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(c) for c in ticks])
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("lenvm serve under load")
    run.save_figure(fig, "serve.png")


# -- command line ---------------------------------------------------------------------------

TABLE = "table.md"


def add_arguments(p) -> None:
    p.add_argument(
        "--lenvm", type=options.path, help="a trained LenVM folder (default: a fresh attached head)"
    )
    p.add_argument("--base-url", help="load a running server instead of starting one")
    p.add_argument("--api-key", help="bearer key of that server")
    p.add_argument(
        "--concurrency",
        type=options.positive_int,
        nargs="+",
        default=[1, 4, 16],
        help="concurrent clients per row",
    )
    p.add_argument(
        "--modes", nargs="+", choices=MODES, default=list(MODES), help="plain and/or guided requests"
    )
    p.add_argument(
        "--new-tokens", type=options.positive_int, default=64, help="tokens per request (EOS ignored)"
    )
    p.add_argument(
        "--requests-per-client",
        type=options.positive_int,
        default=4,
        help="requests each client sends in turn",
    )
    p.add_argument(
        "--batch-size", type=options.positive_int, default=16, help="the started server's batch size"
    )
    p.add_argument(
        "--num-candidates",
        type=options.positive_int,
        default=8,
        help="the started server's candidates per step",
    )
    p.add_argument("--tilt", type=float, default=1.0, help="guided requests' length_tilt")


def main(args) -> None:
    run_serve_bench(
        args.out,
        model=args.model,
        lenvm=args.lenvm,
        base_url=args.base_url,
        api_key=args.api_key,
        concurrency=args.concurrency,
        modes=args.modes,
        new_tokens=args.new_tokens,
        requests_per_client=args.requests_per_client,
        batch_size=args.batch_size,
        num_candidates=args.num_candidates,
        tilt=args.tilt,
        device=args.device,
        dtype=args.dtype,
        progress=args.progress,
    )
