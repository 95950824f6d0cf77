import json
from dataclasses import replace
from pathlib import Path

import pytest

from lenvm.demo import DemoConfig, run_demo
from lenvm.io import InputError
from lenvm.model import LengthValueModel
from lenvm.prompt_sets import builtin_prompts


def test_builtin_prompts_are_varied_and_deterministic():
    prompts = builtin_prompts(60, seed=3)
    assert [p.text for p in prompts] == [p.text for p in builtin_prompts(60, seed=3)]
    assert len({p.id for p in prompts}) == 60
    assert len({p.text for p in prompts}) == 60  # no prompt twice: none is both trained and held out
    assert len({p.text for p in builtin_prompts(240, seed=5)}) == 240
    assert {p.extra["domain"] for p in prompts} == {
        "one_word",
        "list",
        "short_explanation",
        "long_explanation",
        "story",
        "arithmetic",
    }


def test_builtin_prompts_refuse_more_than_they_have():
    with pytest.raises(InputError, match="240"):
        builtin_prompts(241)
    with pytest.raises(InputError):
        builtin_prompts(0)


def test_demo_with_too_few_prompts_to_hold_any_out_says_so_before_sampling(tmp_path):
    config = DemoConfig(out=str(tmp_path / "demo"), prompts=1, gsm8k=0, generated=0)
    with pytest.raises(InputError, match="--num-prompts"):
        run_demo(config, generator=object())  # never used: the check comes first
    assert not (tmp_path / "demo" / "rollouts.jsonl").exists()
    # The corrected command then runs there: nothing was made under the settings it refused.
    from dataclasses import replace

    with pytest.raises(InputError, match="--num-prompts"):  # still short, but not "other settings"
        run_demo(replace(config, seed=3), generator=object())
    # Another demo running in the folder: refused, not appending to its rollouts.
    from lenvm.io import RunLock

    with RunLock(tmp_path / "demo", "running the demo"), pytest.raises(InputError, match="another run"):
        run_demo(config, generator=object())


def test_demo_end_to_end_on_tiny_model_and_resume(tmp_path, ending_path, eos_generator, capsys, monkeypatch):
    gsm8k = tmp_path / "gsm8k_train.jsonl"
    rows = [
        {"question": f"Tom has {i} apples and buys 2 more. How many?", "answer": f"#### {i + 2}"}
        for i in range(5)
    ]
    gsm8k.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = DemoConfig(
        out=tmp_path / "demo",
        model=str(ending_path),
        prompts=12,
        n=2,
        gsm8k=2,
        gsm8k_path=str(gsm8k),
        generated=3,
        mix_n=1,
        eval_samples=3,
        eval_fraction=0.2,
        max_new_tokens=16,
    )
    report = run_demo(config, generator=eos_generator)
    out = tmp_path / "demo"
    for name in [
        "prompts.jsonl",
        "rollouts.jsonl",
        "eval_rollouts.jsonl",
        "summary.json",
        "summary.md",
        "values.html",
        "lenvm/config.json",
        "lenvm/loss.png",
        "lenvm/end_head.safetensors",
    ]:
        assert (out / name).exists(), name
    # 10 built-in training prompts x 2 completions, 2 GSM8K and 3 generated prompts x 1; 2 held-out
    # built-in prompts x 3, never trained on.
    assert len((out / "rollouts.jsonl").read_text().splitlines()) == 25
    assert len((out / "eval_rollouts.jsonl").read_text().splitlines()) == 6
    train_ids = {json.loads(line)["prompt_id"] for line in (out / "rollouts.jsonl").open()}
    eval_ids = {json.loads(line)["prompt_id"] for line in (out / "eval_rollouts.jsonl").open()}
    assert len(eval_ids) == 2 and not train_ids & eval_ids
    trained = json.loads((out / "lenvm" / "config.json").read_text())["training"]
    assert trained["loss"] == "bce"  # the demo's own default, not lenvm train's (the paper's mse)
    mix = report["training"]["by_domain"]
    assert mix["math"]["prompts"] == 2 and {"writing", "qa", "reasoning"} <= set(mix)
    held = report["held_out"]
    assert {"prompt_mre", "baseline_prompt_mre", "token_mae", "baseline_token_mae"} <= set(held)
    # The per-domain table uses the same truths as the headline figure (its predictions come from
    # a float32 forward, the headline's from training's bfloat16 feature cache: hence rel=1e-2;
    # a truth one token off, on answers this short, is several percent off).
    domains = report["held_out_by_domain"].values()
    assert sum(d["prompts"] for d in domains) == held["eval_prompts"]
    weighted = sum(d["prompts"] * d["lenvm_mre"] for d in domains) / held["eval_prompts"]
    assert weighted == pytest.approx(held["prompt_mre"], rel=1e-2)
    assert json.loads((out / "summary.json").read_text())["gamma"] == report["gamma"]
    assert "prompt-boundary mean relative error" in capsys.readouterr().out
    # The end head is trained on the same rollouts and saved with the LenVM.
    end = report["end_head"]
    assert end["states"] > 0 and end["eval_mae"] >= 0
    lenvm = LengthValueModel.from_pretrained(out / "lenvm", generator=eos_generator)
    assert lenvm.end_head is not None and lenvm.config.end_head["training"] == end
    assert "End head: tokens until the generator could next end naturally" in (out / "summary.md").read_text()

    # A second run resumes: no new rollouts, the same LenVM and the end head trained beside it.
    def train_end_head(*args, **kwargs):
        raise AssertionError("the resumed run trained its end head again")

    monkeypatch.setattr("lenvm.end_head.train_end_head", train_end_head)
    again = run_demo(config, generator=eos_generator)
    assert len((out / "rollouts.jsonl").read_text().splitlines()) == 25
    assert len((out / "eval_rollouts.jsonl").read_text().splitlines()) == 6
    assert again["end_head"] == end
    assert LengthValueModel.from_pretrained(out / "lenvm", generator=eos_generator).end_head is not None
    monkeypatch.undo()
    # A rerun with other settings (more prompts, another temperature) is refused before it
    # touches the folder: its rollouts would mix two runs' prompts.
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(InputError, match=r"other settings \(prompts, temperature\)"):
        run_demo(replace(config, prompts=14, temperature=0.5), generator=eos_generator)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    # The generator named another way is the same setting.
    monkeypatch.setattr("lenvm.end_head.train_end_head", train_end_head)
    monkeypatch.chdir(Path(ending_path).parent)
    run_demo(replace(config, model=f"./{Path(ending_path).name}/"), generator=eos_generator)
    monkeypatch.undo()
    # A folder of other files is not the demo's to overwrite.
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "prompts.jsonl").write_text('{"id": "x", "prompt": "my own"}\n')
    with pytest.raises(InputError, match="not a demo's"):
        run_demo(replace(config, out=mine), generator=eos_generator)
    assert (mine / "prompts.jsonl").read_text() == '{"id": "x", "prompt": "my own"}\n'
    # Without it, the LenVM has none.
    bare = run_demo(replace(config, out=tmp_path / "bare", end_head=False), generator=eos_generator)
    assert bare["end_head"] is None and not (tmp_path / "bare/lenvm/end_head.safetensors").exists()
    assert json.loads((tmp_path / "bare/lenvm/config.json").read_text()).get("end_head") is None


def test_generated_prompts_are_varied_deterministic_and_carry_their_instruction():
    from lenvm.prompt_sets import GENERATED_DOMAINS, generated_prompts

    prompts = generated_prompts(300, seed=2)
    assert [p.text for p in prompts] == [p.text for p in generated_prompts(300, seed=2)]
    assert len({p.text for p in prompts}) == 300 and len({p.id for p in prompts}) == 300
    assert {p.extra["domain"] for p in prompts} == set(GENERATED_DOMAINS)
    kinds = {p.extra["instruction"] for p in prompts}
    assert {"none", "words", "sentences", "bullets", "brief", "detailed"} == kinds
    for p in prompts:
        if p.extra["instruction"] in ("words", "bullets"):
            assert str(p.extra["asked"]) in p.text
    assert {p.text for p in generated_prompts(300, seed=3)} != {p.text for p in prompts}
    with pytest.raises(InputError):
        generated_prompts(0)
    with pytest.raises(InputError, match="domains"):
        generated_prompts(5, domains=("poetry",))


def test_generated_chinese_prompts_are_the_same_kinds_of_request_in_chinese():
    from lenvm.prompt_sets import GENERATED_DOMAINS, generated_prompts

    english = generated_prompts(300, seed=2)
    prompts = generated_prompts(300, seed=2, lang="zh")
    assert [p.text for p in prompts] == [p.text for p in generated_prompts(300, seed=2, lang="zh")]
    assert len({p.text for p in prompts}) == 300
    assert not {p.id for p in prompts} & {p.id for p in english}  # one rollout file can hold both
    assert {p.extra["domain"] for p in prompts} == set(GENERATED_DOMAINS)
    assert {p.extra["lang"] for p in prompts} == {"zh"}
    assert {p.extra["instruction"] for p in prompts} == {p.extra["instruction"] for p in english}
    for p in prompts:
        assert not any("a" <= ch.lower() <= "z" for ch in p.text), p.text  # no English left in
        if p.extra["instruction"] in ("words", "bullets"):
            assert str(p.extra["asked"]) in p.text
    with pytest.raises(InputError, match="'fr'"):
        generated_prompts(5, lang="fr")


def test_demo_trains_without_gsm8k_when_the_default_file_is_missing(tmp_path, capsys, monkeypatch):
    from lenvm.demo import mix_prompts

    monkeypatch.chdir(tmp_path)  # the default path is relative: nothing there
    mix = mix_prompts(DemoConfig(gsm8k=5, generated=4))
    assert len(mix) == 4 and "training without GSM8K" in capsys.readouterr().out


def test_a_gsm8k_file_given_that_is_missing_is_an_error_before_any_work(tmp_path, capsys):
    """A mistyped --gsm8k would otherwise run the whole demo without the problems asked for."""
    from lenvm.cli import main

    missing = tmp_path / "missing.jsonl"
    code = main(["demo", "--out", str(tmp_path / "demo"), "--gsm8k", str(missing), "--model", "none"])
    assert code == 2 and f"no GSM8K training file at {missing}" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()
    from lenvm.demo import mix_prompts

    assert len(mix_prompts(DemoConfig(gsm8k=0, gsm8k_path=str(missing), generated=1))) == 1  # none asked for


def test_demo_mix_takes_generated_chinese_prompts_and_reports_them_apart():
    from lenvm.demo import mix_prompts, training_mix

    mix = mix_prompts(DemoConfig(gsm8k=0, generated=3, generated_zh=3))
    assert [p.extra.get("lang", "en") for p in mix] == ["en"] * 3 + ["zh"] * 3
    assert len({p.id for p in mix}) == 6
    records = [
        {"prompt_id": p.id, "meta": p.extra, "num_tokens": 10 * (i + 1), "finish_reason": "stop"}
        for i, p in enumerate(mix)
    ]
    by_domain = training_mix(records)
    assert by_domain["writing"]["mean_tokens"] == 10 and by_domain["writing (zh)"]["mean_tokens"] == 40
    assert sum(d["prompts"] for d in by_domain.values()) == 6


def test_demo_command_trains_an_end_head_unless_told_not_to():
    from lenvm.cli.commands import build_parser

    assert build_parser().parse_args(["demo"]).end_head is True
    assert build_parser().parse_args(["demo", "--no-end-head"]).end_head is False
