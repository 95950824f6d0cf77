"""Each benchmark end to end on the tiny random model with an untrained attached LenVM."""

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from lenvm.bench import (
    Preset,
    run_all,
    run_length_tokens,
    run_lifebench,
    run_prediction,
    run_tradeoff,
    write_report,
)
from lenvm.bench.common import Models, load_models
from lenvm.bench.predict import cross_domain_folder
from lenvm.io import InputError
from lenvm.model import LengthValueModel

LIFEBENCH_ROWS = [
    {"id": 1, "category": "qa", "type": "Knowledge", "lang": "en", "raw_data": "x",
     "task": "[Instruction] Answer: \n What is the sea? \n\n[Requirement] Your answer must be "
             "{word_count_type} {word_count} words long."},
    {"id": 2, "category": "create", "type": "Story", "lang": "cn",
     "task": "[指令]回答下面的问题：\n 如何搭配衣服 \n\n"
             "[要求]你的回答字数必须{word_count_type} {word_count}字。"},
]  # fmt: skip
GSM8K_ROWS = [
    {"question": "Tom has 3 apples and buys 4 more. How many?", "answer": "3+4=7\n#### 7"},
    {"question": "A box holds 1,000 pens; 1 is lost. How many?", "answer": "#### 999"},
]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    prompts = [
        {"id": "a", "prompt": "List 3 colors.", "domain": "list"},
        {"id": "b", "prompt": "Explain why the sky is blue.", "domain": "explain"},
        {"id": "c", "prompt": "What is 12 plus 30?", "domain": "explain"},
    ]
    trained = [
        {"id": "t1", "prompt": "List 5 animals.", "domain": "list"},
        {"id": "t2", "prompt": "Explain how rain forms.", "domain": "explain"},
        {"id": "t3", "prompt": "Explain what a volcano is, in detail.", "domain": "explain"},
    ]
    return {
        "lifebench": _jsonl(root / "life.jsonl", LIFEBENCH_ROWS),
        "gsm8k": _jsonl(root / "gsm8k.jsonl", GSM8K_ROWS),
        "prompts": _jsonl(root / "prompts.jsonl", prompts),
        "train_prompts": _jsonl(root / "train_prompts.jsonl", trained),
    }


@pytest.fixture(scope="module")
def lenvm_dir(tiny_path, tiny_generator, tmp_path_factory):
    path = tmp_path_factory.mktemp("lenvm") / "lenvm"
    LengthValueModel.from_base(
        tiny_path, kind="attached", gamma=0.9, generator=tiny_generator
    ).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def models(tiny_path, lenvm_dir):
    return load_models(tiny_path, lenvm_dir)


@pytest.fixture(scope="module")
def train_rollouts(models, data, tmp_path_factory):
    from lenvm.prompts import read_prompts
    from lenvm.rollouts import SamplingParams, rollout

    path = tmp_path_factory.mktemp("rollouts") / "rollouts.jsonl"
    rollout((models.generator, models.tokenizer), read_prompts(data["train_prompts"]), path, n=2,
            sampling=SamplingParams(max_new_tokens=6), batch_size=4, progress=False)  # fmt: skip
    return path


def _outputs(folder, *pngs):
    for name in ("results.json", "table.md", "settings.json", *pngs):
        assert (folder / name).is_file(), name
    return json.loads((folder / "results.json").read_text())


def test_lifebench_smoke_and_resume(tmp_path, tiny_path, lenvm_dir, data, models):
    out = tmp_path / "life"
    kwargs = {
        "data": data["lifebench"],
        "targets": (4, 8, 64),
        "max_new_tokens": 12,
        "batch_size": 4,
    }
    results = run_lifebench(out, model=tiny_path, lenvm=lenvm_dir, progress=False, **kwargs)
    assert _outputs(out, "length_score.png", "equal_to_lengths.png") == results
    assert results["targets"] == [4, 8] and results["skipped_targets"] == [64]
    assert results["languages"] == ["en", "zh"]
    summary = results["summary"]
    assert set(summary) == {"prompt", "lenvm-paper", "lenvm-ours"}
    for by_constraint in summary.values():
        assert set(by_constraint) == {"equal_to", "at_most", "at_least"}
        assert set(by_constraint["equal_to"]["by_target"]) == {"4", "8"}
    items = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
    assert len(items) == 2 * 3 * 2 * 3
    assert all(
        i["num_tokens"] <= i["target"]
        for i in items
        if i["method"] == "lenvm-ours" and i["constraint"] == "at_most"
    )
    zh = next(i for i in items if i["lang"] == "zh")
    assert zh["row"] == "2"
    table = (out / "table.md").read_text()
    assert "| method | Equal To deviation | Equal To LS | At Most LS | At Least LS |" in table
    assert (
        "| ended with EOS | natural end (generator p(EOS) >= 0.05; 95% interval) | stopped by a bound "
        "| cut at max_new_tokens | median length / target | mean log-prob / token |"
    ) in table
    assert all(i["eos_prob"] is None or 0 < i["eos_prob"] <= 1 for i in items)
    # A rerun with the same settings generates nothing and gives the same numbers.
    again = run_lifebench(out, models=models, progress=False, **kwargs)
    assert again["summary"] == summary
    assert "seconds" not in again and again["seconds_this_run"] >= 0  # the items' time is not known
    assert len((out / "items.jsonl").read_text().splitlines()) == len(items)
    with pytest.raises(InputError, match="other settings"):
        run_lifebench(out, models=models, progress=False, **{**kwargs, "max_new_tokens": 10})


def test_lifebench_without_lenvm_runs_the_prompt_only(tmp_path, data, models):
    from lenvm.bench.common import Models

    plain = Models(models.generator, models.tokenizer, None, models.name)
    results = run_lifebench(
        tmp_path / "p", models=plain, data=data["lifebench"], targets=(4,), rows=1,
        constraints=("equal_to",), max_new_tokens=6, progress=False,
    )  # fmt: skip
    assert list(results["summary"]) == ["prompt"]
    assert (tmp_path / "p" / "equal_to_lengths.png").is_file()
    run_lifebench(
        tmp_path / "p", models=plain, data=data["lifebench"], targets=(4,), rows=1,
        constraints=("at_most",), max_new_tokens=6, progress=False,
    )  # fmt: skip
    assert not (tmp_path / "p" / "equal_to_lengths.png").exists()  # no earlier run's plot left as this one's
    with pytest.raises(InputError, match="LenVM"):
        run_lifebench(tmp_path / "q", models=plain, data=data["lifebench"], methods=["lenvm-ours"])


def test_numpy_settings_reach_results_json_as_numbers(tmp_path, data, models):
    plain = Models(models.generator, models.tokenizer, None, models.name)
    results = run_lifebench(
        tmp_path / "p", models=plain, data=data["lifebench"], targets=(np.int64(4),), rows=1,
        constraints=("equal_to",), max_new_tokens=6, max_prompt_tokens=np.int64(400),
        num_candidates=np.int32(4), progress=False,
    )  # fmt: skip
    stored = json.loads((tmp_path / "p" / "results.json").read_text())
    assert stored["settings"]["max_prompt_tokens"] == 400 and stored["settings"]["num_candidates"] == 4
    assert stored["targets"] == [4] and stored == json.loads(json.dumps(results, default=int))


def test_lifebench_skips_targets_without_room_and_counts_too_long_rows_among_those_asked_for(
    tmp_path, data, models
):
    from lenvm.bench.common import Models

    plain = Models(models.generator, models.tokenizer, None, models.name)
    long_row = dict(LIFEBENCH_ROWS[0], id=3, task=LIFEBENCH_ROWS[0]["task"].replace("sea", "sea " * 2000))
    rows = _jsonl(tmp_path / "life.jsonl", [*LIFEBENCH_ROWS, long_row])
    common = dict(models=plain, data=rows, constraints=("equal_to",), max_prompt_tokens=400, progress=False)
    # An Equal To target of max_new_tokens leaves no room for its EOS: skipped, not a failed run.
    results = run_lifebench(tmp_path / "all", targets=(4, 6), max_new_tokens=6, **common)
    assert results["targets"] == [4] and results["skipped_targets"] == [6]
    assert results["rows_too_long"] == ["3"]
    assert "skipped at or above max_new_tokens: 6" in (tmp_path / "all" / "table.md").read_text()
    # Chinese rows only, or named rows: the English row too long is none of theirs.
    zh = run_lifebench(tmp_path / "zh", targets=(4,), max_new_tokens=6, langs=["zh"], **common)
    named = run_lifebench(tmp_path / "named", targets=(4,), max_new_tokens=6, row_ids=["1"], **common)
    assert zh["rows_too_long"] == named["rows_too_long"] == []
    assert "too long" not in (tmp_path / "zh" / "table.md").read_text()


def test_tradeoff_smoke(tmp_path, data, models):
    out = tmp_path / "trade"
    results = run_tradeoff(
        out, models=models, gsm8k=data["gsm8k"], arithmetic_problems=2, arithmetic_levels=(1,),
        betas=(5.0,), max_new_tokens=8, batch_size=4, progress=False,
    )  # fmt: skip
    assert _outputs(out, "pareto.png") == results
    assert set(results["curves"]) == {"gsm8k", "word_problem_l1"}
    gsm = results["curves"]["gsm8k"]
    assert [p["beta"] for p in gsm["tilt"]] == [0.0, 5.0]
    assert all(p["n"] == 2 for p in gsm["tilt"] + gsm["budget"])
    assert all(0 <= p["pass_at_1"] <= 1 for p in gsm["budget"])
    items = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
    assert len(items) == 2 * 4 and {"predicted", "correct", "answer"} <= set(items[0])


@pytest.fixture(scope="module")
def ending_models(ending_path, eos_generator):
    """A generator that ends most answers within a few tokens, with a LenVM on it (predictions
    need answers that end)."""
    lenvm = LengthValueModel.from_base(ending_path, kind="attached", gamma=0.9, generator=eos_generator)
    name = eos_generator[0].name_or_path  # as the rollouts it samples name it
    return Models(*eos_generator, lenvm.eval(), name=name, lenvm_name="tiny-eos-lenvm")


def test_prediction_smoke(tmp_path, data, ending_models, train_rollouts):
    out = tmp_path / "pred"
    results = run_prediction(
        out, models=ending_models, prompts=data["prompts"], train_rollouts=train_rollouts, samples=5,
        max_new_tokens=24, batch_size=4, progress=False,
    )  # fmt: skip
    for name in ("results.json", "table.md", "samples.jsonl", "calibration.png", "prediction.png"):
        assert (out / name).is_file(), name
    assert json.loads((out / "results.json").read_text()) == results
    assert set(results["metrics"]) == {"list", "explain", "all"}
    for name in ("lenvm", "mean", "mean_rc", "ridge", "prompt_length"):
        assert results["metrics"]["all"][name]["mre"] >= 0
        rho = results["metrics"]["all"][name]["spearman"]
        assert rho is None or -1 <= rho <= 1
    assert results["metrics"]["all"]["mean"]["spearman"] is None  # a constant ranks nothing
    assert results["metrics"]["explain"]["prompts"] == 2 and results["prompts_mostly_cut"] == []
    every = results["metrics"]["all"]
    if every["truth_reliability"] is not None:  # the split halves of 5 samples may rank nothing
        assert every["spearman_ceiling"] == pytest.approx(max(every["truth_reliability"], 0) ** 0.5)
    assert "Spearman ceiling" in (out / "table.md").read_text()
    assert len(results["per_prompt"]) == 3 and results["prediction"]["prompts_per_second"] > 0
    table = (out / "table.md").read_text()
    assert "| list | 1 |" in table and "ridge on prompt features" in table and "Spearman" in table
    assert len((out / "samples.jsonl").read_text().splitlines()) == 15
    # Another LenVM scored on the same folder reuses the samples; without training rollouts
    # only the LenVM is scored.
    alone = run_prediction(out, models=ending_models, prompts=data["prompts"], samples=5,
                           max_new_tokens=24, limit=1, progress=False)  # fmt: skip
    assert set(alone["metrics"]["list"]) == {
        "prompts",
        "mean_truth",
        "lenvm",
        "truth_reliability",
        "spearman_ceiling",
    }
    assert alone["metrics"]["list"]["spearman_ceiling"] is None  # one prompt: nothing to rank
    assert len((out / "samples.jsonl").read_text().splitlines()) == 15


def test_prediction_on_given_rollouts_matches_sampling_them(tmp_path, data, ending_models, train_rollouts):
    """Scoring on rollouts already drawn gives what sampling those answers gave; bad truth sets
    are refused."""
    sampled = tmp_path / "sampled"
    first = run_prediction(sampled, models=ending_models, prompts=data["prompts"],
                           train_rollouts=train_rollouts, samples=4, max_new_tokens=24,
                           progress=False)  # fmt: skip
    answers = sampled / "samples.jsonl"
    given = run_prediction(tmp_path / "given", models=ending_models, truth_rollouts=[answers],
                           train_rollouts=train_rollouts, progress=False)  # fmt: skip

    def by_prompt(results):
        return sorted(results["per_prompt"], key=lambda row: row["prompt_id"])

    # The same truths; the same predictions up to batching (the prompts come in the file's order).
    for mine, theirs in zip(by_prompt(given), by_prompt(first), strict=True):
        fields = ("prompt_id", "domain", "truth")
        assert [mine[f] for f in fields] == [theirs[f] for f in fields]
        assert mine["lenvm"] == pytest.approx(theirs["lenvm"], rel=1e-4)
    assert given["metrics"]["all"]["lenvm"] == pytest.approx(first["metrics"]["all"]["lenvm"], rel=1e-3)
    assert given["samples"] == 4 and given["settings"]["truth_rollouts"] == [str(answers)]
    assert not (tmp_path / "given" / "samples.jsonl").exists()  # nothing was drawn
    # Each prompt's answers in another order (a resumed run writes them so): the same figures.
    groups: dict[str, list[str]] = {}
    for line in answers.read_text().splitlines():
        groups.setdefault(json.loads(line)["prompt_id"], []).append(line)
    shuffled = tmp_path / "shuffled.jsonl"
    shuffled.write_text("".join(line + "\n" for lines in groups.values() for line in reversed(lines)))
    again = run_prediction(tmp_path / "again", models=ending_models, truth_rollouts=[shuffled],
                           train_rollouts=train_rollouts, progress=False)  # fmt: skip
    for domain, figures in given["metrics"].items():
        for key in ("truth_reliability", "spearman_ceiling", "mean_truth"):
            assert again["metrics"][domain][key] == (figures[key] and pytest.approx(figures[key], rel=1e-9))

    records = [json.loads(line) for line in answers.read_text().splitlines()]
    # Uneven samples per prompt: the table says how many, as a range.
    first_prompt = records[0]["prompt_id"]
    uneven = [r for r in records if r["prompt_id"] != first_prompt or r["sample_index"] < 2]
    path = _jsonl(tmp_path / "uneven.jsonl", uneven)
    run_prediction(tmp_path / "uneven", models=ending_models, truth_rollouts=[path], progress=False)
    assert "ground truth from 2-4 samples per prompt" in (tmp_path / "uneven" / "table.md").read_text()
    hotter = [{**r, "sampling": {**r["sampling"], "temperature": 1.3}} for r in records[:2]]
    other = [{**records[0], "generator": "another-model"}]
    for name, bad, match in [
        ("mixed", records + hotter, "mix sampling policies"),
        ("other", other, "not of .*model"),
        ("twice", records + records[:1], "twice"),
    ]:
        path = _jsonl(tmp_path / f"{name}.jsonl", bad)
        with pytest.raises(InputError, match=match):
            run_prediction(tmp_path / name, models=ending_models, truth_rollouts=[path], progress=False)
    with pytest.raises(InputError, match="not both"):
        run_prediction(tmp_path / "both", models=ending_models, truth_rollouts=[answers],
                       prompts=data["prompts"], progress=False)  # fmt: skip


def test_prediction_across_domains(tmp_path, data, ending_models, train_rollouts):
    out = tmp_path / "cross"
    results = run_prediction(
        out, models=ending_models, prompts=data["prompts"], train_rollouts=train_rollouts, samples=3,
        max_new_tokens=24, batch_size=4, progress=False, cross_domain=["list"],
    )  # fmt: skip
    assert set(results["cross_domain"]) == {"list"}
    assert set(results["cross_domain"]["list"]) >= {"prompts", "lenvm", "ridge", "mean"}
    head = out / "cross" / "list" / "lenvm" / "head.safetensors"
    assert head.is_file() and results["cross_domain_gamma"]["list"] > 0
    assert "trained without it" in (out / "table.md").read_text()

    # Run again: the LenVM without the domain is reused; with other training rollouts, retrained.
    def rerun(rollouts):
        run_prediction(out, models=ending_models, prompts=data["prompts"], train_rollouts=rollouts, samples=3,
                       max_new_tokens=24, batch_size=4, progress=False, cross_domain=["list"])  # fmt: skip
        return head.read_bytes()

    first = head.read_bytes()
    assert rerun(train_rollouts) == first
    fewer = tmp_path / "fewer.jsonl"
    fewer.write_text("".join(Path(train_rollouts).read_text().splitlines(keepends=True)[1:]))
    assert rerun(fewer) != first
    with pytest.raises(InputError, match="no held-out prompt"):
        run_prediction(out, models=ending_models, prompts=data["prompts"], train_rollouts=train_rollouts,
                       samples=3, max_new_tokens=24, progress=False, cross_domain=["poetry"])  # fmt: skip


HOSTILE_DOMAINS = ["../up", "/abs", "..", ".", "", " ", "a|b", "a/b", "a\\b", "Math", "math", "MATH",
                   "中文", "tex $\\frac$", "nul", "x" * 100, "up.abc"]  # fmt: skip


def test_cross_domain_folders_stay_inside_and_apart(tmp_path):
    folders = [cross_domain_folder(d) for d in HOSTILE_DOMAINS]
    assert len({f.lower() for f in folders}) == len(folders)  # apart on a case-blind file system too
    cross = tmp_path.resolve() / "cross"
    for folder in folders:
        assert re.fullmatch(r"[a-z0-9][a-z0-9._-]{0,63}", folder), folder
        assert (cross / folder).resolve().parent == cross
    plain = ["math", "creative_writing", "l2-3"]  # the names domains usually have: kept
    assert [cross_domain_folder(d) for d in plain] == plain


def test_prediction_across_domains_of_any_name(tmp_path, data, ending_models, train_rollouts):
    """Domains named like paths, with a "|", math markup and CJK: each LenVM trained without one
    lands under cross/ (results.json says where), and the table and plots hold the names."""
    names = {"list": "../up", "explain": "tex $\\frac$ 中文|x"}
    prompts = [json.loads(line) for line in Path(data["prompts"]).read_text().splitlines()]
    prompts = _jsonl(tmp_path / "prompts.jsonl", [{**p, "domain": names[p["domain"]]} for p in prompts])
    rollouts = [json.loads(line) for line in Path(train_rollouts).read_text().splitlines()]
    for r in rollouts:
        r["meta"]["domain"] = names[r["meta"]["domain"]]
    rollouts = _jsonl(tmp_path / "rollouts.jsonl", rollouts)
    out = tmp_path / "runs" / "out"
    results = run_prediction(
        out, models=ending_models, prompts=prompts, train_rollouts=rollouts, samples=3,
        max_new_tokens=24, batch_size=4, progress=False, cross_domain=list(names.values()),
    )  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["out"]
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["cross"]
    where = results["cross_domain_lenvm"]
    assert set(where) == set(names.values())
    for domain, lenvm in where.items():
        assert lenvm == f"cross/{cross_domain_folder(domain)}/lenvm"
        assert (out / lenvm / "head.safetensors").is_file()
    table = (out / "table.md").read_text().split("\n\n")
    rows = [line for part in table if part.startswith("| domain") for line in part.splitlines()]
    assert {len(re.split(r"(?<!\\)\|", row)) for row in rows} == {10}  # 8 columns, none shifted
    assert "| ../up |" in "\n".join(rows) and r"| tex $\frac$ 中文\|x |" in "\n".join(rows)
    assert (out / "calibration.png").is_file() and (out / "prediction.png").is_file()


def test_prediction_refuses_prompts_it_was_trained_on(tmp_path, data, ending_models, train_rollouts):
    from lenvm.rollouts import read_rollouts

    trained = read_rollouts(train_rollouts)[0]
    held = _jsonl(tmp_path / "held.jsonl", [{"id": "x", "prompt": trained["prompt"], "domain": "d"}])
    with pytest.raises(InputError, match="trained on"):
        run_prediction(tmp_path / "o", models=ending_models, prompts=held, train_rollouts=train_rollouts,
                       samples=2, max_new_tokens=8, progress=False)  # fmt: skip


def test_a_held_out_prompt_trained_on_with_other_template_arguments_is_no_leak():
    """The same question with thinking on is another prompt than the one trained with it off."""
    from lenvm.bench.predict import _check_not_trained_on
    from lenvm.prompts import Prompt

    trained = [{"prompt": "What is 2 + 2?", "chat_template_kwargs": {"enable_thinking": False}}]
    _check_not_trained_on(
        [Prompt("q", text="What is 2 + 2?", chat_template_kwargs={"enable_thinking": True})], trained
    )
    _check_not_trained_on([Prompt("q", text="What is 2 + 2?")], trained)
    with pytest.raises(InputError, match="1 held-out prompt.s. were trained on"):
        _check_not_trained_on(
            [Prompt("q", text="What is 2 + 2?", chat_template_kwargs={"enable_thinking": False})], trained
        )


def test_a_schedule_pool_tells_template_arguments_apart_as_json(tmp_path):
    """One prompt id with false in one record and 0 in another names two prompts."""
    from lenvm.bench.schedule import Pool

    record = {"prompt_id": "a", "sample_index": 0, "prompt": "Hi", "prompt_token_ids": [5],
              "completion": "", "completion_token_ids": [2], "finish_reason": "stop", "num_tokens": 1,
              "generator": "tiny", "sampling": {"max_new_tokens": 4},
              "chat_template_kwargs": {"enable_thinking": False}}  # fmt: skip
    path = _jsonl(tmp_path / "r.jsonl", [record, {**record, "sample_index": 1}])
    assert set(Pool.read([path], "tiny").prompts) == {"a"}
    zero = {**record, "sample_index": 1, "chat_template_kwargs": {"enable_thinking": 0}}
    path = _jsonl(tmp_path / "r.jsonl", [record, zero])
    with pytest.raises(InputError, match="prompt id 'a' names two different prompts"):
        Pool.read([path], "tiny")


def test_prediction_needs_answers_that_end(tmp_path, data, models):
    """The random generator's answers are all cut at 6 tokens: no prompt has a ground truth."""
    with pytest.raises(InputError, match="most of its samples cut"):
        run_prediction(tmp_path / "cut", models=models, prompts=data["prompts"], samples=2,
                       max_new_tokens=6, progress=False)  # fmt: skip


def test_length_tokens_smoke(tmp_path, models, train_rollouts):
    out = tmp_path / "tokens"
    results = run_length_tokens(
        out, models=models, rollouts=train_rollouts, min_count=1, top=5, progress=False
    )
    assert _outputs(out, "length_tokens.png") == results
    assert results["completions"] == 6
    assert "Pushes longer" in (out / "table.md").read_text()
    assert run_length_tokens(out, models=models, rollouts=train_rollouts, min_count=1, top=5) == results
    # Given only the LenVM folder, a benchmark loads the generator it was made for, as the CLI does.
    alone = run_length_tokens(
        tmp_path / "alone",
        lenvm=models.lenvm_name,
        rollouts=train_rollouts,
        min_count=1,
        top=5,
        progress=False,
    )
    assert alone["completions"] == 6 and alone["settings"]["model"] == models.name
    # Rollouts that changed under the same name are not answered with the old results.
    grown = tmp_path / "grown.jsonl"
    grown.write_bytes(train_rollouts.read_bytes())
    run_length_tokens(tmp_path / "grown", models=models, rollouts=grown, min_count=1, progress=False)
    grown.write_bytes(train_rollouts.read_bytes() * 2)
    with pytest.raises(InputError, match="other settings \\(rollouts_digest\\)"):
        run_length_tokens(tmp_path / "grown", models=models, rollouts=grown, min_count=1, progress=False)


def test_run_all_smoke(tmp_path, ending_path, data):
    preset = Preset(
        temperature=1.0,
        max_prompt_tokens=None,
        train_pool={"builtin": 3, "math": 1, "word_problem": 2, "instruction": 1},
        train_samples=2,
        train_max_new_tokens=6,
        lifebench_rows=1,
        lifebench_targets=(4,),
        lifebench_max_new_tokens=6,
        tradeoff_gsm8k=1,
        tradeoff_arithmetic=1,
        tradeoff_levels=(1,),
        tradeoff_betas=(0.0, 5.0),
        tradeoff_max_new_tokens=6,
        predict_pool={"builtin": 2, "math": 1, "word_problem": 1, "instruction": 1},
        predict_samples=2,
        predict_max_new_tokens=6,
    )
    out = tmp_path / "all"
    results = run_all(
        out, model=ending_path, lifebench_data=data["lifebench"], gsm8k=data["gsm8k"],
        gsm8k_train=data["gsm8k"], batch_size=4, progress=False, preset=preset,
    )  # fmt: skip
    assert {"lifebench", "tradeoff", "predict", "length_tokens"} <= set(results)
    assert (out / "lenvm" / "model" / "head.safetensors").is_file()
    report = (out / "report.md").read_text()
    for title in (
        "Token-level LIFEBench",
        "Cost/quality trade-off",
        "Prompt-boundary",
        "Length tokens",
    ):
        assert f"## {title}" in report
    assert "![pareto](tradeoff/pareto.png)" in report
    (out / "speed").mkdir()
    (out / "speed" / "table.md").write_text("| a | b |\n|---|---|\n| 1 | 2 |\n")
    report = write_report(out).read_text()
    assert "## Decoding speed" in report and "- settings: custom" in report
    held_out = [json.loads(line) for line in (out / "prompts" / "held_out.jsonl").read_text().splitlines()]
    assert {"math", "word_problem", "instruction"} <= {p["domain"] for p in held_out}
    predicted = results["predict"]
    assert predicted["prompts"] + len(predicted["prompts_mostly_cut"]) == len(held_out)


def test_bench_cli_runs_each_benchmark(
    tmp_path, tiny_path, ending_path, tiny_generator, lenvm_dir, data, train_rollouts, capsys
):
    from lenvm.cli import main

    q_dir = tmp_path / "q"
    LengthValueModel.from_base(tiny_path, kind="q", gamma=0.9, generator=tiny_generator).save_pretrained(
        q_dir
    )

    common = ["--model", str(tiny_path), "--no-progress"]
    guided = [*common, "--lenvm", str(lenvm_dir), "--batch-size", "4"]
    runs = {
        "lifebench": [*guided, "--data", str(data["lifebench"]), "--targets", "4", "--rows", "1",
                      "--constraints", "equal_to", "--max-new-tokens", "8"],
        "tradeoff": [*guided, "--gsm8k", str(data["gsm8k"]), "--gsm8k-problems", "1",
                     "--arithmetic-problems", "1", "--levels", "1", "--betas", "5", "--max-new-tokens", "6"],
        "predict": ["--model", str(ending_path), "--no-progress", "--lenvm", str(lenvm_dir),
                    "--prompts", str(data["prompts"]), "--samples", "2", "--limit", "1",
                    "--max-new-tokens", "24"],
        "length-tokens": [*common, "--lenvm", str(lenvm_dir), "--rollouts", str(train_rollouts),
                          "--min-count", "1"],
        "speed": [*common, "--batch-sizes", "1", "--candidates", "2", "--new-tokens", "3",
                  "--generate-batch-sizes", "2"],
        "q-agreement": [*common, "--exact", str(lenvm_dir), "--q", str(q_dir), "--rollouts",
                        str(train_rollouts), "--positions", "2"],
        "vision": ["--no-progress", "--images", "3", "--n", "1", "--max-new-tokens", "6",
                   "--batch-size", "2", "--target", "3", "--epochs", "1"],
        "train-memory": ["--no-progress", "--records", "24", "--paths", "head", "--modes", "stream"],
    }  # fmt: skip
    for name, args in runs.items():
        out = tmp_path / name
        assert main(["bench", name, "--out", str(out), *args]) == 0, name
        assert (out / "results.json").is_file(), name
        assert (out / "table.md").read_text() in capsys.readouterr().out, name


def test_bench_cli_bad_input_is_a_clear_error(tmp_path, tiny_path, lenvm_dir, data, capsys):
    from lenvm.cli import main

    args = ["bench", "lifebench", "--out", str(tmp_path / "x"), "--model", str(tiny_path)]
    assert main([*args, "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl" in capsys.readouterr().err
    # LenVM methods without a LenVM
    assert main([*args, "--data", str(data["lifebench"]), "--methods", "lenvm-ours"]) == 2
    assert "LenVM" in capsys.readouterr().err
    # Results never go into a folder of something else: a model's, say.
    from lenvm.bench.common import Run

    before = sorted(p.name for p in Path(tiny_path).iterdir())
    life = ["--data", str(data["lifebench"]), "--targets", "4", "--rows", "1", "--max-new-tokens", "8"]
    assert main(["bench", "lifebench", "--out", str(tiny_path), "--model", str(tiny_path), *life]) == 2
    assert "use another output folder" in capsys.readouterr().err
    # bench vision: a batch or target its samples cannot meet, before anything is sampled
    vision = ["bench", "vision", "--out", str(tmp_path / "v"), "--no-progress", "--images", "3", "--n", "1"]
    assert main([*vision, "--batch-size", "3"]) == 2
    assert "more than the 2 completions training gets" in capsys.readouterr().err
    assert main([*vision, "--batch-size", "2", "--max-new-tokens", "6", "--target", "6"]) == 2
    assert "equal_to 6 can never be met" in capsys.readouterr().err
    assert not (tmp_path / "v" / "rollouts.jsonl").exists()
    too_long = ["--data", str(data["lifebench"]), "--rows", "1", "--max-new-tokens", "5000"]
    assert main(["bench", "lifebench", "--out", str(tmp_path / "long"), *args[4:6], *too_long]) == 2
    assert "every LIFEBench row is too long" in capsys.readouterr().err
    with pytest.raises(InputError, match="use another output folder"):
        run_prediction(tiny_path, model=str(tiny_path), lenvm=lenvm_dir, prompts=str(data["prompts"]))
    from lenvm.io import RunLock

    (tmp_path / "busy").mkdir()
    with (
        RunLock(tmp_path / "busy", "writing this results folder"),
        pytest.raises(InputError, match="another run"),
    ):
        run_prediction(tmp_path / "busy", model=str(tiny_path), lenvm=lenvm_dir, prompts=str(data["prompts"]))
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(InputError, match="not a benchmark's results"):
        Run(tmp_path / "notes", {})
    # A second run into a folder in use would mix its settings and answers with the first's.
    with (
        Run(tmp_path / "shared", {"max_new_tokens": 12}),
        pytest.raises(InputError, match="another run is writing this results folder"),
    ):
        Run(tmp_path / "shared", {"max_new_tokens": 16})
    with Run(tmp_path / "shared", {"max_new_tokens": 12}):
        pass
    assert sorted(p.name for p in Path(tiny_path).iterdir()) == before


def test_schedule_smoke_and_resume(tmp_path, data, ending_models, monkeypatch):
    import lenvm.bench.schedule as schedule_module
    from lenvm.bench import run_schedule
    from lenvm.prompts import read_prompts
    from lenvm.rollouts import SamplingParams, rollout

    served, serve = [], schedule_module._serve

    def logged(models, queue, aging, batch_size, workload, progress, desc):
        served.append((desc, queue, max(r.sampling.max_new_tokens for _, r in workload)))
        return serve(models, queue, aging, batch_size, workload, progress, desc)

    monkeypatch.setattr(schedule_module, "_serve", logged)

    replayed = tmp_path / "held_out_rollouts.jsonl"
    rollout((ending_models.generator, ending_models.tokenizer), read_prompts(data["prompts"]), replayed, n=4,
            sampling=SamplingParams(max_new_tokens=16), batch_size=4, progress=False)  # fmt: skip
    out = tmp_path / "sched"
    kwargs = {"rollouts": [replayed], "models": ending_models, "batch_size": 2, "requests": 300,
              "loads": (0.5, 0.9), "live": 6, "progress": False}  # fmt: skip
    results = run_schedule(out, **kwargs)
    for name in ("results.json", "table.md", "schedule.png", "settings.json"):
        assert (out / name).is_file(), name
    policies = results["simulated"]["policies"]
    assert set(policies) == {"fcfs", "lenvm", "prompt_length", "oracle"}
    assert policies["oracle"]["mean_latency"] <= policies["fcfs"]["mean_latency"]
    assert set(results["load_sweep"]) == {"0.5", "0.9"} and "0.05" in results["aging_sweep"]
    for live in results["live"].values():
        assert live["requests"] == 6 and live["tokens"] > 0
        assert (
            live["latency_steps"]["mean"] >= 1 and live["ttft_steps"]["p99"] <= live["latency_steps"]["p99"]
        )
    assert "Live, in the engine" in (out / "table.md").read_text()
    # Every policy is warmed up, untimed, before the first is timed: a cold start counted against FCFS.
    assert [(d, q) for d, q, _ in served] == [("warm-up", "fcfs"), ("warm-up", "shortest"),
                                              ("fcfs", "fcfs"), ("lenvm", "shortest")]  # fmt: skip
    assert served[0][2] == 4
    # A rerun serves nothing again: the live figures come from the results folder's log.
    assert len((out / "items.jsonl").read_text().splitlines()) == 2
    again = run_schedule(out, **kwargs)
    assert again["live"] == results["live"]
    with pytest.raises(InputError, match="other settings"):
        run_schedule(out, **{**kwargs, "load": 0.5})
    with pytest.raises(InputError, match=r"other settings \(requests\)"):  # every setting counts
        run_schedule(out, **{**kwargs, "requests": 200})
    for aging in (-1.0, float("nan"), float("inf")):  # refused before anything runs
        with pytest.raises(InputError, match="ageing must be a finite number >= 0"):
            run_schedule(tmp_path / "bad", **{**kwargs, "aging": aging})
    # Answers of another generator: their lengths say nothing of the LenVM's predictions.
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({**json.loads(line), "generator": "someone/else"}) + "\n"
                             for line in replayed.read_text().splitlines()))  # fmt: skip
    with pytest.raises(InputError, match="hold answers of someone/else"):
        run_schedule(tmp_path / "other", **{**kwargs, "rollouts": [other]})
    # Loads as a Python caller may give them: integers, out of order (the plot read "1.0" for 1).
    swept = run_schedule(tmp_path / "ints", **{**kwargs, "loads": (1, 0.5), "live": 0})
    assert list(swept["load_sweep"]) == ["0.5", "1.0"] and (tmp_path / "ints" / "schedule.png").is_file()


def test_prediction_truth_counts_the_eos_once_as_training_does():
    """A rollout record's num_tokens already holds the EOS of an answer that ended: the truth of
    bench predict (and the lengths bench schedule replays) is that count, as training's held-out
    evaluation and the LenVM's predicted lengths count it."""
    from lenvm.bench.predict import sample_length, truths_of
    from lenvm.evaluation import prompt_length_truth

    ended = {"prompt_id": "a", "num_tokens": 3, "completion_token_ids": [5, 6, 2], "finish_reason": "stop"}
    cut = {"prompt_id": "a", "num_tokens": 4, "completion_token_ids": [5, 6, 7, 8], "finish_reason": "length"}
    assert sample_length(ended) == 3 and sample_length(cut) == 4
    expected = prompt_length_truth([3, 3], [True, True], 0.9)
    assert truths_of([ended, ended], 0.9)["a"] == pytest.approx(expected)


def test_the_constant_baselines_are_the_arithmetic_and_the_return_consistent_means(tiny_generator):
    from lenvm.bench.predict import Baselines

    records = [
        {"prompt_id": str(i), "prompt": f"p{i}", "num_tokens": n, "finish_reason": "stop"}
        for i, n in enumerate([2, 4, 100])
    ]
    fitted = Baselines.fit(tiny_generator[1], records, gamma=0.9)
    assert fitted.mean_length == pytest.approx(106 / 3)
    # the length whose return is the mean return: far below the arithmetic mean on a long tail
    expected = math.log(1 - sum(1 - 0.9**n for n in (2, 4, 100)) / 3) / math.log(0.9)
    assert fitted.mean_rc_length == pytest.approx(expected) and fitted.mean_rc_length < 10


def test_bench_vision_warms_up_before_it_times(tmp_path, monkeypatch):
    """The first stage's time must not hold one-off costs: a short untimed decode comes first."""
    from types import SimpleNamespace

    from lenvm.bench import vision as bench_vision
    from lenvm.bench.common import WARMUP_TOKENS
    from lenvm.decoding import Engine

    events: list = []
    generate = Engine.generate

    def logged(self, requests, **kwargs):
        events.append(("decode", requests[0].sampling.max_new_tokens))
        return generate(self, requests, **kwargs)

    class TimingStarted(Exception):
        pass

    def perf_counter():
        raise TimingStarted

    monkeypatch.setattr(Engine, "generate", logged)
    monkeypatch.setattr(bench_vision, "time", SimpleNamespace(perf_counter=perf_counter))
    with pytest.raises(TimingStarted):
        bench_vision.run_vision(
            tmp_path, images=3, n=1, max_new_tokens=12, batch_size=2, target=3, epochs=1, progress=False
        )
    assert events == [("decode", WARMUP_TOKENS)]


def test_a_policy_other_tools_recorded_is_read_as_ours(models):
    """A LenVM trained on rollouts of another tool may record top_k -1 (vLLM's "off") or a null
    setting: a benchmark samples under that policy as ours writes it, not refusing it."""
    from dataclasses import replace

    from lenvm.bench.common import bench_sampling

    recorded = {"temperature": 0.7, "top_p": None, "top_k": -1, "min_p": 0.0}
    lenvm = models.lenvm
    original = lenvm.config
    lenvm.config = replace(original, sampling=recorded)
    try:
        sampling = bench_sampling(models, max_new_tokens=8)
        assert (sampling.temperature, sampling.top_p, sampling.top_k) == (0.7, 1.0, 0)
        assert bench_sampling(models, max_new_tokens=8, top_k=5).top_k == 5  # an option still wins
    finally:
        lenvm.config = original


def test_prompt_features_read_the_text_parts_of_messages(tiny_generator):
    """Rollouts of chat prompts whose content is a list of parts (as images come) fit baselines."""
    from lenvm.bench.predict import prompt_features
    from lenvm.prompts import Prompt

    parts = Prompt("a", messages=[{"role": "user", "content": [{"type": "text", "text": "Write 50 words."}]}])
    plain = Prompt("b", messages=[{"role": "user", "content": "Write 50 words."}])
    assert prompt_features(tiny_generator[1], parts) == prompt_features(tiny_generator[1], plain)
    assert prompt_features(tiny_generator[1], parts)[1:] == [math.log1p(50), 1.0]
