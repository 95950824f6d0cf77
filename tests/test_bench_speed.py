"""The decoding speed benchmark end to end on the tiny model."""

import json
import math

import numpy as np
import pytest

from lenvm.bench import speed
from lenvm.bench.common import positive_counts
from lenvm.bench.speed import run_speed
from lenvm.io import InputError
from lenvm.model import LengthValueModel

GUIDED = ("attached", "standalone", "q", "naive", "processor")
SMALL = dict(batch_sizes=(1, 2), candidates=(2,), new_tokens=4, generate_batch_sizes=(2,), progress=False)


def _positive(x) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_speed_measures_every_row_and_resumes(tiny_path, tmp_path, monkeypatch, capfd):
    out = tmp_path / "speed"
    results = run_speed(out, model=tiny_path, **SMALL)
    printed = capfd.readouterr()  # transformers' own load bars aside (the CLI turns them off)
    assert printed.out == "" and "speed:" not in printed.err

    expected = {"generate-b1", "plain-b1", "generate-b2", "plain-b2"}
    expected |= {f"{method}-k2-b{b}" for method in GUIDED for b in (1, 2)}
    rows = {r["key"]: r for r in results["rows"]}
    assert len(rows) == len(results["rows"]) and set(rows) == expected
    for key, r in rows.items():
        assert r["tokens"] == 4 * r["batch"], key  # EOS disabled: every request runs the full length
        assert all(_positive(r[name]) for name in ("seconds", "tokens_per_s", "x_plain", "peak_mib")), key
        assert r["lenvm"] == (speed.FRESH if r["method"] in GUIDED else None)
        assert r["x_plain"] == pytest.approx(r["tokens_per_s"] / rows[f"plain-b{r['batch']}"]["tokens_per_s"])
        own = "generate" if r["method"] == "processor" else "plain"
        assert r["x_own_plain"] == pytest.approx(
            r["tokens_per_s"] / rows[f"{own}-b{r['batch']}"]["tokens_per_s"]
        )
    assert rows["plain-b2"]["x_plain"] == 1.0
    assert set(results["plain_vs_generate"]) == {"1", "2"}
    assert all(_positive(x) for x in results["plain_vs_generate"].values())

    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    table = (out / "table.md").read_text()
    assert table.count("\n| ") == 1 + len(expected)  # header and one line per row
    assert "| naive | 2 | 1 |" in table and "Plain engine vs transformers generate: batch 1:" in table
    assert (out / "speed.png").read_bytes().startswith(b"\x89PNG")

    # A rerun measures nothing: it loads no model and leaves the item log as it was.
    log = (out / "items.jsonl").read_text()
    monkeypatch.setattr(speed, "load_models", lambda *a, **k: pytest.fail("a finished run reloaded models"))
    again = run_speed(out, model=tiny_path, **SMALL)
    assert (out / "items.jsonl").read_text() == log
    assert [r["key"] for r in again["rows"]] == [r["key"] for r in results["rows"]]
    assert [r["seconds"] for r in again["rows"]] == [r["seconds"] for r in results["rows"]]


def test_an_interrupted_run_measures_only_the_missing_rows(tiny_path, tmp_path):
    out = tmp_path / "speed"
    options = dict(SMALL, batch_sizes=(1,), generate_batch_sizes=())
    first = run_speed(out, model=tiny_path, **options)
    lines = (out / "items.jsonl").read_text().splitlines(keepends=True)
    dropped = json.loads(lines[2])["key"]
    (out / "items.jsonl").write_text("".join(lines[:2] + lines[3:]))
    second = run_speed(out, model=tiny_path, **options)
    lines_after = (out / "items.jsonl").read_text().splitlines(keepends=True)
    assert lines_after[:-1] == lines[:2] + lines[3:]
    assert json.loads(lines_after[-1])["key"] == dropped
    assert [r["key"] for r in second["rows"]] == [r["key"] for r in first["rows"]]


def test_a_trained_lenvm_serves_its_kind(tiny_path, tiny_generator, tmp_path):
    folder = tmp_path / "lenvm"
    LengthValueModel.from_base(tiny_path, kind="q", generator=tiny_generator).save_pretrained(folder)
    results = run_speed(
        tmp_path / "speed",
        model=tiny_path,
        lenvm=folder,
        prompts=["Count to ten."],
        repeats=2,
        **dict(SMALL, batch_sizes=(2,), generate_batch_sizes=()),
    )
    rows = {r["key"]: r for r in results["rows"]}
    assert rows["q-k2-b2"]["lenvm"] == str(folder) and rows["attached-k2-b2"]["lenvm"] == speed.FRESH
    assert all(r["tokens"] == 2 * 4 * 2 for r in rows.values())  # batch x new tokens x repeats
    assert f"q from `{folder}`" in (tmp_path / "speed" / "table.md").read_text()


def test_methods_pick_rows_and_plain_is_always_the_reference(tiny_path, tmp_path):
    options = dict(SMALL, batch_sizes=(1,), generate_batch_sizes=(2,))
    results = run_speed(tmp_path / "speed", model=tiny_path, methods=["generate"], **options)
    assert [r["key"] for r in results["rows"]] == ["generate-b1", "plain-b1", "generate-b2", "plain-b2"]
    q_only = run_speed(
        tmp_path / "q", model=tiny_path, methods=["q"], **dict(options, generate_batch_sizes=())
    )
    assert [r["key"] for r in q_only["rows"]] == ["plain-b1", "q-k2-b1"]
    assert "transformers generate" not in (tmp_path / "q" / "table.md").read_text()


def test_counts_are_sorted_distinct_plain_ints_and_a_bad_one_is_named():
    counts = positive_counts([np.int64(8), 1, 8], "the batch sizes")
    assert counts == (1, 8) and all(type(c) is int for c in counts)
    assert positive_counts(np.int32(2), "the batch sizes") == (2,)  # one count alone
    with pytest.raises(InputError, match=r"^each of the batch sizes must be a positive integer, got 0$"):
        positive_counts((4, 0), "the batch sizes")
    with pytest.raises(InputError, match="got '16'"):
        positive_counts("16", "the batch sizes")


@pytest.mark.parametrize(
    "options",
    [
        dict(methods=["fast"]),
        dict(batch_sizes=(0, 1)),
        dict(batch_sizes=(True,)),
        dict(generate_batch_sizes=(-2,)),
        dict(batch_sizes=(), generate_batch_sizes=()),
        dict(candidates=(0,)),
        dict(candidates=(1,)),
        dict(candidates=(2.5,)),
        dict(new_tokens=0),
        dict(repeats=0),
        dict(dtype="float64"),
        dict(prompts=[]),
        dict(prompts=["fine", "  "]),
    ],
)
def test_bad_input_raises_before_anything_runs(tiny_path, tmp_path, options):
    with pytest.raises(InputError):
        run_speed(tmp_path / "speed", model=tiny_path, **{**SMALL, **options})
    assert not (tmp_path / "speed").exists()
