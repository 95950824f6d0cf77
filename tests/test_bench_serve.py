"""`lenvm bench serve` against a `lenvm serve` process on the tiny model."""

import asyncio
import json

import pytest

from lenvm.bench.serve import run_serve_bench
from lenvm.io import InputError


def test_serve_bench_measures_every_row_and_resumes(tiny_path, tmp_path):
    out = tmp_path / "serve"
    settings = dict(model=str(tiny_path), concurrency=[1, 2], new_tokens=3, requests_per_client=1,
                    batch_size=4, num_candidates=2, progress=False)  # fmt: skip
    results = run_serve_bench(out, **settings)
    rows = {(r["mode"], r["clients"]): r for r in results["rows"]}
    assert set(rows) == {("plain", 1), ("plain", 2), ("guided", 1), ("guided", 2)}
    for (_, clients), row in rows.items():
        assert row["requests"] == clients
        assert row["tokens"] == 3 * row["requests"]  # every request generated exactly new_tokens
        assert 0 < row["ttft_p50"] <= row["ttft_p99"] <= row["latency_p99"]
        assert row["tokens_per_s"] == pytest.approx(row["tokens"] / row["seconds"])
    assert (out / "fresh-head" / "config.json").is_file()
    table = (out / "table.md").read_text()
    assert "| guided | 2 | 2 |" in table and (out / "serve.png").is_file()
    items = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
    assert len(items) == 4
    # a rerun finds every row measured
    again = run_serve_bench(out, **settings)
    assert again["rows"] == results["rows"]


def test_serve_bench_checks_its_settings(tmp_path):
    with pytest.raises(InputError, match="concurrency"):
        run_serve_bench(tmp_path, concurrency=[0])
    with pytest.raises(InputError, match="modes"):
        run_serve_bench(tmp_path, modes=["fast"])
    with pytest.raises(InputError, match="new_tokens"):
        run_serve_bench(tmp_path, new_tokens=0)


def test_a_server_that_never_comes_up_is_stopped(tiny_path, tmp_path, monkeypatch):
    """Ctrl-C (or a timeout) while waiting for the server: the server process goes too, not left
    running on its port."""
    import lenvm.bench.serve as serve

    started = []

    def interrupted(url, process, log):
        started.append(process)
        raise KeyboardInterrupt

    monkeypatch.setattr(serve, "_wait_healthy", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_serve_bench(
            tmp_path / "serve", model=str(tiny_path), concurrency=[1], new_tokens=2, progress=False
        )
    assert started and started[0].poll() is not None


def test_the_serve_bench_runs_inside_a_running_event_loop(tiny_path, tiny_generator, tmp_path):
    """A notebook's kernel runs an event loop, in which asyncio.run refuses to start another: the
    bench's clients run on a loop of their own in a worker thread there."""
    from test_serve import running

    from lenvm.decoding import Engine
    from lenvm.model import LengthValueModel

    lenvm = LengthValueModel.from_base(tiny_path, generator=tiny_generator)

    async def notebook_cell(url):
        settings = dict(
            concurrency=[1], modes=["guided"], new_tokens=2, requests_per_client=1, progress=False
        )
        return run_serve_bench(tmp_path / "serve", model=str(tiny_path), base_url=url, **settings)

    with running(Engine(*tiny_generator, lenvm=lenvm, num_candidates=2)) as (url, _):
        results = asyncio.new_event_loop().run_until_complete(notebook_cell(url))
    [row] = results["rows"]
    assert row["mode"] == "guided" and row["tokens"] == 2
