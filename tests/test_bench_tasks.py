import json
import re
from pathlib import Path

import numpy as np
import pytest

from lenvm.bench import lifebench, tasks
from lenvm.bench.common import Job, Run, load_models
from lenvm.bench.predict import Ridge, asked_number, prediction_metrics
from lenvm.bench.tradeoff import curves_for
from lenvm.decoding import Request, SamplingParams
from lenvm.io import InputError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
LITE = SHARED / "lifebench" / "data_lite.jsonl"
needs_shared = pytest.mark.skipif(not LITE.is_file(), reason="shared data not present")


# -- GSM8K answers -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("solution", "expected"),
    [
        ("She makes 9 * 2 = $<<9*2=18>>18.\n#### 18", 18),
        ("Total 80,000+50,000\n#### 70,000", 70000),
        ("#### -3", -3),
        ("so 7.5 hours\n#### 7.5", 7.5),
        ("#### $1,080", 1080),
    ],
)
def test_gold_answer(solution, expected):
    assert tasks.gold_answer(solution) == expected


def test_gold_answer_without_marker():
    with pytest.raises(InputError):
        tasks.gold_answer("the answer is 4")


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("First 1,000 + 234 = 1,234. The answer is 1,234.", 1234),
        ("Adding up gives \\boxed{42} in total, not 41.", 42),
        ("So she has 12 apples left.", 12),
        ("5 - 8 = -3\nThe answer is -3.", -3),
        ("It costs $3.50 each, so the answer is: 7.", 7),
        ("The final answer is $12.75.", 12.75),
        ("He walks 5-3=2 miles", 2),
        ("Answer: 18\n\nHope this helps with your 3 questions!", 18),
        ("#### 99", 99),
        ("I do not know.", None),
    ],
)
def test_extract_answer(completion, expected):
    assert tasks.extract_answer(completion) == expected


def test_is_correct_compares_numbers():
    assert tasks.is_correct("The answer is 1,234.", 1234.0)
    assert tasks.is_correct("The answer is 2.50", 2.5)
    assert not tasks.is_correct("The answer is 12", 13.0)
    assert not tasks.is_correct("no number", 1.0)


@needs_shared
def test_read_gsm8k():
    problems = tasks.read_gsm8k(SHARED / "gsm8k" / "test.jsonl", limit=5)
    assert len(problems) == 5
    assert problems[0].answer == 18
    assert problems[0].domain == "math"
    prompt = problems[0].prompt()
    assert prompt.text.startswith("Janet")
    assert prompt.extra["domain"] == "math"


def test_read_gsm8k_rejects_bad_rows(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "no marker"}) + "\n")
    with pytest.raises(InputError, match="record 1"):
        tasks.read_gsm8k(path)


# -- arithmetic word problems ------------------------------------------------------------------


@pytest.mark.parametrize("level", [1, 2, 3])
def test_arithmetic_is_seeded_and_correct(level):
    first = tasks.arithmetic_problems(40, level, seed=3)
    again = tasks.arithmetic_problems(40, level, seed=3)
    other = tasks.arithmetic_problems(40, level, seed=4)
    assert first == again
    assert [p.question for p in first] != [p.question for p in other]
    assert len({p.id for p in first}) == 40
    for problem in first:
        numbers = [int(n) for n in re.findall(r"\d+", problem.question)]
        if level == 1:
            assert problem.answer == sum(numbers)
            assert problem.question.count(".") == 1  # a one-sentence story
        elif level == 2:
            assert problem.answer == numbers[0] + numbers[1] - numbers[2]
        else:
            assert problem.answer == numbers[0] * numbers[1] + numbers[2] - numbers[3]
        assert problem.answer >= 0
        assert problem.domain == "word_problem"


def test_arithmetic_unknown_level():
    with pytest.raises(InputError):
        tasks.arithmetic_problems(3, level=4)


# -- LIFEBench templates -----------------------------------------------------------------------


@needs_shared
@pytest.mark.parametrize("constraint", ["equal_to", "at_most", "at_least"])
def test_token_task_english(constraint):
    row = next(r for r in lifebench.read_lifebench(LITE) if r.id == "122")
    words = {"equal_to": "equal to", "at_most": "at most", "at_least": "at least"}[constraint]
    text = lifebench.token_task(row, constraint, 64)
    assert text.endswith(f"[Requirement] Your response must be {words} 64 tokens long.")
    assert text.startswith("[Instruction] Respond to this question: \n How to Use Git Effectively.")
    assert "{" not in text


@needs_shared
@pytest.mark.parametrize(
    ("constraint", "word"), [("equal_to", "等于"), ("at_most", "至多有"), ("at_least", "至少有")]
)
def test_token_task_chinese(constraint, word):
    rows = lifebench.read_lifebench(LITE)
    row = next(r for r in rows if r.id == "123")
    assert row.lang == "zh"
    text = lifebench.token_task(row, constraint, 32)
    assert text.endswith(f"[要求]你的回答token数必须{word} 32个token。")
    assert "字" not in text.splitlines()[-1]


@needs_shared
def test_every_lite_row_converts():
    rows = lifebench.read_lifebench(LITE)
    assert {r.lang for r in rows} == {"en", "zh"}
    for row in rows:
        for constraint in ("equal_to", "at_most", "at_least"):
            last = lifebench.token_task(row, constraint, 128).splitlines()[-1]
            assert "128" in last and "token" in last
            assert "word" not in last.lower() and "字" not in last and "{" not in last


def test_reader_keeps_extra_fields_and_detects_language(tmp_path):
    path = tmp_path / "life.jsonl"
    rows = [
        {"id": 7, "category": "qa", "type": "x", "lang": "en", "task": "Q?\nBe {word_count_type} "
         "{word_count} words long.", "raw_data": "r", "source": "extra"},
        {"task": "问题\n[要求]字数必须{word_count_type} {word_count}字。"},
        {"id": "9", "task": "Write a {word_count}-word essay, {word_count_type} that."},
    ]  # fmt: skip
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    first, second, third = lifebench.read_lifebench(path)
    assert first.id == "7" and first.extra == {"raw_data": "r", "source": "extra"}
    assert second.lang == "zh" and second.id == "1" and second.category == "unknown"
    assert lifebench.token_task(second, "at_least", 16).endswith("token数必须至少有 16个token。")
    assert lifebench.token_task(third, "at_most", 16) == "Write a 16-token essay, at most that."


def test_template_without_unit_is_rejected(tmp_path):
    path = tmp_path / "life.jsonl"
    path.write_text(json.dumps({"task": "Write {word_count_type} {word_count} lines."}) + "\n")
    (row,) = lifebench.read_lifebench(path)
    with pytest.raises(InputError, match="unit"):
        lifebench.token_task(row, "equal_to", 8)


def test_reader_rejects_rows_without_placeholder(tmp_path):
    path = tmp_path / "life.jsonl"
    path.write_text(json.dumps({"task": "Write something."}) + "\n")
    with pytest.raises(InputError, match="record 1"):
        lifebench.read_lifebench(path)


def test_row_selection_spreads_over_groups():
    rows = [
        lifebench.Row(str(i), "{word_count} words", lang, category)
        for i, (lang, category) in enumerate(
            [("en", "create")] * 3 + [("zh", "create")] * 2 + [("en", "qa")] * 2
        )
    ]
    picked = lifebench.select_rows(rows, 3, None)
    assert {(r.lang, r.category) for r in picked} == {
        ("en", "create"),
        ("zh", "create"),
        ("en", "qa"),
    }
    assert [r.id for r in lifebench.select_rows(rows, None, ["zh"])] == ["3", "4"]


def test_skipped_rows_and_chosen_ids_split_tuning_from_reporting():
    rows = [
        lifebench.Row(str(i), "{word_count} words", "en", category)
        for i, category in enumerate(["create"] * 4 + ["qa"] * 3 + ["reasoning"] * 2)
    ]
    # in turn from each category: 0 4 7 | 1 5 8 | 2 6 | 3
    tune = lifebench.select_rows(rows, 3, ["en"])
    report = lifebench.select_rows(rows, None, ["en"], skip=3)
    assert [r.id for r in tune] == ["0", "4", "7"]
    assert [r.id for r in report] == ["1", "2", "3", "5", "6", "8"]
    assert [r.id for r in lifebench.select_rows(rows, 2, None, skip=3)] == ["1", "5"]
    assert [r.id for r in lifebench.select_rows(rows, None, None, ids=["8", "2"])] == ["2", "8"]
    with pytest.raises(InputError, match="not found"):
        lifebench.select_rows(rows, None, None, ids=["2", "99"])
    with pytest.raises(InputError, match="no LIFEBench rows"):
        lifebench.select_rows(rows, 2, None, skip=9)


# -- prediction baselines ----------------------------------------------------------------------


def test_ridge_recovers_a_linear_function():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 3)) * [1.0, 10.0, 0.1]
    y = 2.0 + x @ np.array([3.0, -0.5, 7.0])
    ridge = Ridge.fit(x, y, alpha=0.0)
    np.testing.assert_allclose(ridge.coef, [3.0, -0.5, 7.0], atol=1e-8)
    assert ridge.intercept == pytest.approx(2.0)
    np.testing.assert_allclose(ridge.predict(x[:5]), y[:5])
    shrunk = Ridge.fit(x, y, alpha=1e4)
    assert np.all(np.abs(shrunk.coef) < np.abs(ridge.coef))


def test_ridge_tolerates_a_constant_feature():
    x = np.column_stack([np.arange(10.0), np.ones(10)])
    ridge = Ridge.fit(x, 1.0 + 2.0 * np.arange(10.0), alpha=0.0)
    assert ridge.predict(np.array([[20.0, 1.0]]))[0] == pytest.approx(41.0)


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("List 7 fruits, one per line.", 7),
        ("Write a story of about 4 sentences about a cat.", 4),
        ("The reply must be at most 64 tokens long.", 64),
        ("你的回答token数必须等于 32个token。", 32),
        ("Tom has 3 apples and buys 4 more.", None),
    ],
)
def test_asked_number(text, number):
    assert asked_number(text) == number


def test_prediction_metrics_refuse_samples_without_gamma():
    """The truth's reliability weighs the samples with gamma: without it, a clear error."""
    truth = np.array([3.0, 4.0, 5.0])
    predictions = {"lenvm": np.array([3.0, 4.5, 6.0])}
    samples = [[1, 2, 3], [3, 4, 5], [5, 6, 7]]
    with pytest.raises(InputError, match="needs gamma"):
        prediction_metrics(truth, predictions, ["a"] * 3, samples)
    metrics = prediction_metrics(truth, predictions, ["a"] * 3, samples, gamma=0.9)
    assert metrics["a"]["prompts"] == 3 and "truth_reliability" in metrics["a"]


# -- trade-off curves --------------------------------------------------------------------------


def test_budget_curve_cuts_plain_answers():
    items = [
        {"beta": 0.0, "num_tokens": n, "correct": c}
        for n, c in [(10, True), (20, True), (40, False), (80, True)]
    ] + [{"beta": 5.0, "num_tokens": n, "correct": c} for n, c in [(8, True), (12, False)]]
    curves = curves_for(items, [0.0, 5.0], budgets=[15, 1000])
    b15, b1000 = curves["budget"]
    assert b15["mean_length"] == pytest.approx((10 + 15 + 15 + 15) / 4)
    assert b15["pass_at_1"] == pytest.approx(0.25)  # only the 10-token answer fits
    assert b1000["mean_length"] == pytest.approx(37.5)
    assert b1000["pass_at_1"] == pytest.approx(0.75)
    plain, tilted = curves["tilt"]
    assert plain["pass_at_1"] == pytest.approx(0.75) and plain["mean_length"] == 37.5
    assert tilted["mean_length"] == 10 and tilted["pass_at_1"] == 0.5
    # at 10 tokens the budget curve is below its first point: clamped to it
    assert tilted["budget_pass_at_1_same_length"] == pytest.approx(0.25)
    default = curves_for(items, [0.0])["budget"]
    assert default[-1]["budget"] == 80 and default[-1]["pass_at_1"] == pytest.approx(0.75)


# -- resumable results folders -----------------------------------------------------------------


def _jobs(names):
    return [
        Job(f"k/{n}", Request(n, SamplingParams(max_new_tokens=len(n), seed=0)), {"name": n}) for n in names
    ]


def test_run_resumes_and_checks_settings(tmp_path, tiny_path):
    models = load_models(tiny_path)
    judged = []

    def judge(job, result):
        judged.append(job.key)
        return {"judged": True}

    settings = {"model": "m", "targets": (1, 2)}
    with Run(tmp_path / "r", settings) as run:
        records = run.run_jobs(_jobs(["a", "bb"]), models, 1, "t", progress=False)
    assert [1 <= r["num_tokens"] <= len(r["name"]) for r in records] == [True, True]
    # a crash mid-line must not break the resume
    with (tmp_path / "r" / "items.jsonl").open("a") as fh:
        fh.write('{"key": "k/cc", "num_tok')
    with Run(tmp_path / "r", settings) as run:
        records = run.run_jobs(_jobs(["a", "bb", "ccc"]), models, 2, "t", False, judge)
    assert judged == ["k/ccc"]  # only the new item ran
    assert [r["name"] for r in records] == ["a", "bb", "ccc"]
    assert records[2]["judged"] and "judged" not in records[0]
    lines = (tmp_path / "r" / "items.jsonl").read_text().splitlines()
    assert len(lines) == 3
    with pytest.raises(InputError, match="other settings"):
        Run(tmp_path / "r", {"model": "other", "targets": [1, 2]})


def test_run_settings_bind_only_once_something_was_made_and_compare_paths_by_file(tmp_path, monkeypatch):
    data = tmp_path / "data.jsonl"
    data.write_text("{}\n")
    Run(tmp_path / "r", {"data": str(data), "n": 1}).close()  # a run refused before any item
    with Run(tmp_path / "r", {"data": str(data), "n": 2}) as run:  # the corrected command
        run.write_json("results.json", {})
    monkeypatch.chdir(tmp_path)
    Run(tmp_path / "r", {"data": "./data.jsonl", "n": 2}).close()  # the same file, spelled otherwise
    with pytest.raises(InputError, match=r"other settings \(n\)"):
        Run(tmp_path / "r", {"data": "data.jsonl", "n": 3})


def test_clipped_ridge_stays_inside_its_training_range():
    from lenvm.bench.predict import ClippedRidge

    rng = np.random.default_rng(1)
    x = rng.uniform(1, 3, size=(50, 2))
    y = 5.0 - 2.0 * x[:, 0] + 0.1 * rng.normal(size=50)  # longer prompts, shorter answers
    model = ClippedRidge.fit(x, y, alpha=0.0)
    inside = model.predict(x)
    np.testing.assert_allclose(inside, np.clip(model.ridge.predict(x), y.min(), y.max()))
    # Far outside the training prompts (a prompt 10x longer) the plain ridge extrapolates to
    # nonsense; the clipped one predicts what the longest training prompts got.
    far = np.array([[30.0, 2.0]])
    assert model.ridge.predict(far)[0] < y.min() - 40
    assert model.predict(far)[0] == pytest.approx(model.predict(np.array([[x[:, 0].max(), 2.0]]))[0])
    assert y.min() <= model.predict(far)[0] <= y.max()


def test_held_out_prompts_from_files_and_gsm8k_rows(tmp_path):
    from lenvm.bench.predict import evaluation_prompts

    gsm8k = tmp_path / "g.jsonl"
    gsm8k.write_text(
        "".join(json.dumps({"question": f"Q{i}?", "answer": f"#### {i}"}) + "\n" for i in range(6))
    )
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"id": "x", "prompt": "Hi", "domain": "chat"}) + "\n")
    chosen = evaluation_prompts(prompts, gsm8k, (2, 5))
    assert [p.id for p in chosen] == ["x", "gsm8k-2", "gsm8k-3", "gsm8k-4"]
    assert chosen[1].extra["domain"] == "math"
    with pytest.raises(InputError, match="no held-out prompts"):
        evaluation_prompts()
    with pytest.raises(InputError, match="no problems"):
        evaluation_prompts(gsm8k=gsm8k, gsm8k_rows=(6, 9))
    with pytest.raises(InputError, match="unique"):
        evaluation_prompts([prompts, prompts])


@needs_shared
def test_row_selection_refuses_a_language_lifebench_does_not_have():
    rows = lifebench.read_lifebench(LITE)
    assert {r.lang for r in lifebench.select_rows(rows, None, ["Chinese"], 0, None)} == {"zh"}
    with pytest.raises(InputError, match="unknown language"):
        lifebench.select_rows(rows, None, ["fr"], 0, None)
