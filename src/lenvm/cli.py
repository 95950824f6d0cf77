"""The ``lenvm`` command line: one thin command per library entry point."""

from __future__ import annotations

import argparse
import errno
import json
import sys
from pathlib import Path

from lenvm.io import InputError


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _gamma(text: str) -> float | None:
    if text == "auto":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"gamma must be 'auto' or a number, got {text!r}") from None


def _prompts_from_args(args) -> list:
    from lenvm.prompts import as_prompt, read_prompts

    if getattr(args, "prompts", None):
        return read_prompts(args.prompts)
    if getattr(args, "prompt", None) is not None:
        return [as_prompt(args.prompt)]
    raise InputError("give --prompt TEXT or --prompts FILE.jsonl")


# -- commands ------------------------------------------------------------------------------


def cmd_rollout(args) -> None:
    from lenvm.rollouts import SamplingParams, rollout

    sampling = SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
    )
    summary = rollout(
        args.model,
        _prompts_from_args(args),
        args.out,
        n=args.n,
        sampling=sampling,
        batch_size=args.batch_size,
        backend=args.backend,
        base_url=args.base_url,
        api_model=args.api_model,
        device=args.device,
    )
    print(json.dumps(summary.to_dict(), indent=2, default=str))


def cmd_train(args) -> None:
    from lenvm.train import TrainConfig, train

    config = TrainConfig(
        kind=args.kind,
        gamma=args.gamma,
        truncated=args.truncated,
        eval_fraction=args.eval_fraction,
        freeze_backbone=True if args.freeze_backbone else None,
        epochs=args.epochs,
        lr=args.lr,
        batch_tokens=args.batch_tokens,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        bf16=not args.no_bf16,
        head_hidden_size=args.head_hidden_size,
        feature_layer=args.feature_layer,
        max_length=args.max_length,
        seed=args.seed,
    )
    result = train(args.rollouts, args.base, args.out, config, eval_rollouts=args.eval_rollouts)
    if result.metrics:
        print(
            json.dumps(
                {
                    "out": str(result.path),
                    "gamma": result.gamma,
                    "metrics": result.metrics,
                    "data": result.data.to_dict(),
                    "seconds": round(result.seconds, 1),
                    "train_tokens_per_second": round(result.tokens_per_second),
                },
                indent=2,
            )
        )


def cmd_predict(args) -> None:
    from lenvm.model import LengthValueModel

    lenvm = LengthValueModel.from_pretrained(args.lenvm)
    prompts = _prompts_from_args(args)
    lengths = lenvm.predict_length(prompts, batch_size=args.batch_size)
    for prompt, length in zip(prompts, lengths, strict=True):
        if args.json:
            print(json.dumps({"id": prompt.id, "predicted_length": round(length, 2)}))
        else:
            print(f"{prompt.id}\t{length:.1f}")


def cmd_values(args) -> None:
    from lenvm.inspect import render_html, token_values
    from lenvm.io import write_text
    from lenvm.model import LengthValueModel

    lenvm = LengthValueModel.from_pretrained(args.lenvm)
    trace = token_values(lenvm, args.prompt, args.completion, finished=not args.unfinished)
    if args.html:
        write_text(args.html, render_html(trace))
        print(f"wrote {args.html}", file=sys.stderr)
    print(json.dumps(trace.to_dict(), indent=None if args.html else 2, ensure_ascii=False))


def cmd_generate(args) -> None:
    from lenvm.decoding import Control, Engine, Request
    from lenvm.model import LengthValueModel
    from lenvm.models import load_generator

    model, tokenizer = load_generator(args.model, device=args.device or "cpu")
    lenvm = None
    if args.lenvm:
        lenvm = LengthValueModel.from_pretrained(
            args.lenvm, generator=(model, tokenizer), device=args.device or "cpu"
        )
    # Control says which kinds take them
    options = {"rule": args.rule, "best_of": args.best_of, "retries": args.retries}
    if args.equal_to is not None:
        control = Control("equal_to", target=args.equal_to, hard_cap_slack=args.hard_cap_slack, **options)
    elif args.at_most is not None:
        control = Control("at_most", target=args.at_most, hard_cap_slack=args.hard_cap_slack, **options)
    elif args.at_least is not None:
        control = Control("at_least", target=args.at_least, **options)
    elif args.tilt is not None:
        control = Control("tilt", beta=args.tilt, **options)
    else:
        control = Control(**options)
    if control.active and lenvm is None:
        raise InputError("a length control needs a LenVM (--lenvm)")
    prompts = _prompts_from_args(args)
    requests = [
        Request(
            p,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            min_p=args.min_p,
            seed=args.seed,
            control=control,
            return_values=args.values,
        )
        for p in prompts
    ]
    engine = Engine(model, tokenizer, lenvm=lenvm, num_candidates=args.num_candidates)
    results = engine.generate(requests, batch_size=args.batch_size, progress=len(requests) > 1)
    for prompt, result in zip(prompts, results, strict=True):
        if args.json or len(prompts) > 1:
            record = {
                "id": prompt.id,
                "text": result.text,
                "num_tokens": result.num_tokens,
                "finish_reason": result.finish_reason,
                "mean_logprob": round(result.mean_logprob, 4),
                "eos_prob": result.eos_prob,
                "retries": result.retries,
                "decoded_tokens": result.decoded_tokens,
            }
            if args.values:
                record["values"] = result.values
            print(json.dumps(record, ensure_ascii=False))
            continue
        print(result.text)
        print(
            f"\n[{result.num_tokens} tokens, finish: {result.finish_reason}, "
            f"mean log-prob {result.mean_logprob:.3f}"
            + ("" if result.eos_prob is None else f", generator p(EOS) at the end {result.eos_prob:.3f}")
            + (f", end resampled {result.retries}x" if result.retries else "")
            + "]",
            file=sys.stderr,
        )
        if args.values:
            print(json.dumps({"values": result.values}), file=sys.stderr)


def cmd_models(args) -> None:
    from lenvm import models

    if args.action == "list":
        for m in models.list_models():
            state = "prepared" if m["prepared"] else "not prepared"
            print(f"{m['name']}\t{state}\t{m['description']}\t{m['path']}")
    else:
        print(models.prepare(args.name))


def cmd_demo(args) -> None:
    from lenvm.demo import DemoConfig, run_demo

    run_demo(
        DemoConfig(
            out=Path(args.out),
            prompts=args.num_prompts,
            n=args.n,
            eval_samples=args.eval_samples,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            model=args.model,
            seed=args.seed,
        )
    )


def cmd_bench(args) -> None:
    """Each ``lenvm bench`` subcommand calls one entry function of :mod:`lenvm.bench`."""
    from lenvm import bench

    common = {"device": args.device, "dtype": args.dtype, "progress": not args.no_progress}
    sampling = {
        name: getattr(args, name)
        for name in ("temperature", "top_p", "top_k", "min_p")
        if getattr(args, name, None) is not None
    }
    models = {"model": args.model, "lenvm": getattr(args, "lenvm", None)}
    what = args.bench
    if what == "lifebench":
        bench.run_lifebench(
            args.out,
            **models,
            data=args.data,
            targets=args.targets,
            constraints=args.constraints,
            methods=args.methods,
            rows=args.rows,
            langs=args.langs,
            max_new_tokens=args.max_new_tokens,
            max_prompt_tokens=args.max_prompt_tokens,
            num_candidates=args.num_candidates,
            best_of=args.best_of,
            retries=args.retries,
            seed=args.seed,
            batch_size=args.batch_size,
            **sampling,
            **common,
        )
    elif what == "tradeoff":
        bench.run_tradeoff(
            args.out,
            **models,
            gsm8k=None if args.no_gsm8k else args.gsm8k,
            gsm8k_problems=args.gsm8k_problems,
            arithmetic_problems=args.arithmetic_problems,
            arithmetic_levels=args.levels,
            betas=args.betas,
            budgets=args.budgets,
            max_new_tokens=args.max_new_tokens,
            num_candidates=args.num_candidates,
            seed=args.seed,
            batch_size=args.batch_size,
            **sampling,
            **common,
        )
    elif what == "predict":
        bench.run_prediction(
            args.out,
            **models,
            prompts=args.prompts,
            train_rollouts=args.train_rollouts,
            samples=args.samples,
            limit=args.limit,
            max_new_tokens=args.max_new_tokens,
            seed=args.seed,
            batch_size=args.batch_size,
            **sampling,
            **common,
        )
    elif what == "length-tokens":
        bench.run_length_tokens(
            args.out,
            **models,
            rollouts=args.rollouts,
            threshold=args.threshold,
            min_count=args.min_count,
            top=args.top,
            limit=args.limit,
            batch_size=args.batch_size,
            **common,
        )
    elif what == "speed":
        bench.run_speed(
            args.out,
            model=args.model,
            lenvm=args.lenvm,
            batch_sizes=args.batch_sizes,
            candidates=args.candidates,
            new_tokens=args.new_tokens,
            generate_batch_sizes=args.generate_batch_sizes,
            methods=args.methods,
            **common,
        )
        if (Path(args.out).parent / "summary.json").is_file():
            bench.write_report(Path(args.out).parent)  # a speed section joins a bench-all report
    elif what == "q-agreement":
        bench.run_q_agreement(
            args.out,
            model=args.model,
            exact=args.exact,
            q=args.q,
            rollouts=args.rollouts,
            num_candidates=args.num_candidates,
            positions_per_completion=args.positions,
            max_completions=args.limit,
            held_out=args.held_out,
            seed=args.seed,
            **common,
        )
    else:
        bench.run_all(
            args.out,
            **models,
            train_rollouts=args.train_rollouts,
            quick=args.quick,
            lifebench_data=args.data,
            gsm8k=args.gsm8k,
            gsm8k_train=args.gsm8k_train,
            seed=args.seed,
            batch_size=args.batch_size,
            **common,
        )
    table = Path(args.out) / ("report.md" if what == "all" else "table.md")
    if table.is_file():
        print(table.read_text(encoding="utf-8"))


# -- parser --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from lenvm import __version__
    from lenvm.demo import DemoConfig
    from lenvm.models import DEFAULT_MODEL

    parser = argparse.ArgumentParser(
        prog="lenvm",
        description="Length Value Models: predict and control how long a language model will talk.",
    )
    parser.add_argument("--version", action="version", version=f"lenvm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("rollout", help="sample n completions per prompt from a generator")
    p.add_argument("--model", default=DEFAULT_MODEL, help="folder, hub id or built-in alias")
    p.add_argument("--prompts", required=True, help="JSONL: {'prompt': ...} or {'messages': [...]}")
    p.add_argument("--out", required=True, help="rollouts JSONL (appended; a rerun resumes)")
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--backend", choices=["hf", "openai"], default="hf")
    p.add_argument("--base-url", help="OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--api-model", help="model name on the server (default: --model)")
    p.add_argument("--device", help="torch device (default: cuda if available)")
    p.set_defaults(func=cmd_rollout)

    p = sub.add_parser("train", help="train a LenVM on rollouts")
    p.add_argument("--rollouts", required=True)
    p.add_argument(
        "--eval-rollouts",
        help="held-out rollouts of other prompts to evaluate on (then --eval-fraction is not used)",
    )
    p.add_argument("--base", default=DEFAULT_MODEL, help="generator (attached, q) or backbone (standalone)")
    p.add_argument("--out", required=True)
    p.add_argument("--kind", choices=["attached", "standalone", "q"], default="attached")
    p.add_argument("--gamma", type=_gamma, default=None, help="'auto' (p99 rule, default) or a number")
    p.add_argument("--truncated", choices=["bootstrap", "drop"], default="bootstrap")
    p.add_argument("--eval-fraction", type=float, default=0.1, help="share of prompts held out")
    p.add_argument("--freeze-backbone", action="store_true", help="standalone: train the head only")
    p.add_argument("--epochs", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--batch-tokens", type=int, default=4096, help="head training: positions per step")
    p.add_argument("--batch-size", type=int, default=8, help="fine-tuning: sequences per process")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--no-bf16", action="store_true")
    p.add_argument("--head-hidden-size", type=int)
    p.add_argument(
        "--feature-layer",
        type=int,
        help="the backbone layer the head reads (-1: the last; default: 60%% depth for attached "
        "and q heads, the last for standalone)",
    )
    p.add_argument("--max-length", type=int, help="drop sequences longer than this")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("predict", help="predict total answer length from the prompt alone")
    p.add_argument("--lenvm", required=True)
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--prompt")
    group.add_argument("--prompts")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("values", help="per-token values and TD residuals of a completion")
    p.add_argument("--lenvm", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--completion", required=True)
    p.add_argument("--unfinished", action="store_true", help="the completion was cut (no EOS)")
    p.add_argument("--html", help="also write a self-contained HTML view here")
    p.set_defaults(func=cmd_values)

    p = sub.add_parser("generate", help="generate text, optionally steered to a length by a LenVM")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--lenvm", help="LenVM folder (needed for a length control)")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--prompt")
    group.add_argument("--prompts", help="JSONL file; prints one JSON line per prompt")
    control = p.add_mutually_exclusive_group()
    control.add_argument("--equal-to", type=int, metavar="N", help="aim at exactly N tokens")
    control.add_argument("--at-most", type=int, metavar="N", help="stay within N tokens")
    control.add_argument("--at-least", type=int, metavar="N", help="write at least N tokens")
    control.add_argument(
        "--tilt",
        type=float,
        metavar="BETA",
        help="p'(x) ~ p(x) exp(BETA v(x)); positive BETA favours shorter outputs",
    )
    p.add_argument("--rule", choices=["ours", "paper"], default="ours")
    p.add_argument("--hard-cap-slack", type=int, help="force EOS at N + slack tokens (off by default)")
    p.add_argument(
        "--best-of",
        type=int,
        default=1,
        help="--equal-to: sample K answers, keep the natural ending closest to N (K times the cost)",
    )
    p.add_argument(
        "--retries",
        type=int,
        help="--equal-to: resample the end of an answer that does not end naturally up to R times "
        "(default: Control's default for the rule, 0 for paper)",
    )
    p.add_argument("--num-candidates", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--values", action="store_true", help="also print the value after each token")
    p.add_argument("--json", action="store_true")
    p.add_argument("--device")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("models", help="list or prepare built-in models")
    msub = p.add_subparsers(dest="action", required=True)
    msub.add_parser("list")
    prep = msub.add_parser("prepare")
    prep.add_argument("name")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("demo", help="end to end on the built-in model: rollouts, training, evaluation")
    p.add_argument("--out", default="lenvm-demo")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--num-prompts", type=int, default=DemoConfig.prompts)
    p.add_argument("--n", type=int, default=DemoConfig.n, help="completions per training prompt")
    p.add_argument(
        "--eval-samples",
        type=int,
        default=DemoConfig.eval_samples,
        help="completions per held-out prompt (their mean is the ground truth)",
    )
    p.add_argument("--max-new-tokens", type=int, default=DemoConfig.max_new_tokens)
    p.add_argument("--temperature", type=float, default=DemoConfig.temperature)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)

    _add_bench_parser(sub)
    return parser


def _add_bench_parser(sub) -> None:
    from lenvm.bench import lifebench, speed, tasks
    from lenvm.bench.report import DEFAULT_GSM8K_TRAIN
    from lenvm.bench.scoring import CONSTRAINTS
    from lenvm.bench.tradeoff import DEFAULT_BETAS
    from lenvm.models import DEFAULT_MODEL

    bench = sub.add_parser("bench", help="the paper's experiments, speed and Q-head agreement")
    bsub = bench.add_subparsers(dest="bench", required=True)

    def command(name: str, help: str, out: str, lenvm: bool = True, sampling: bool = True):
        p = bsub.add_parser(name, help=help)
        p.add_argument("--out", default=f"results/{out}", help="results folder (a rerun resumes)")
        p.add_argument("--model", default=DEFAULT_MODEL, help="generator: folder, hub id or alias")
        if lenvm:
            p.add_argument("--lenvm", help="LenVM folder")
        p.add_argument("--device", default="cpu")
        p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
        p.add_argument("--no-progress", action="store_true")
        if sampling:
            p.add_argument("--batch-size", type=int, default=8)
            p.add_argument("--seed", type=int, default=0)
            p.add_argument("--max-new-tokens", type=int, default=1024)
            p.add_argument("--num-candidates", type=int, default=8)
            for flag, kind in (
                ("--temperature", float),
                ("--top-p", float),
                ("--top-k", int),
                ("--min-p", float),
            ):
                p.add_argument(flag, type=kind, help="default: the LenVM's training policy")
        p.set_defaults(func=cmd_bench)
        return p

    p = command("lifebench", "token-level LIFEBench: Equal To / At Most / At Least", "lifebench")
    p.add_argument("--data", default=lifebench.DEFAULT_DATA, help="LIFEBench JSONL")
    p.add_argument("--targets", type=int, nargs="+", default=list(lifebench.DEFAULT_TARGETS))
    p.add_argument("--constraints", nargs="+", choices=list(CONSTRAINTS), default=list(CONSTRAINTS))
    p.add_argument("--methods", nargs="+", choices=list(lifebench.METHODS), help="default: all")
    p.add_argument("--rows", type=int, help="evaluate the first N rows")
    p.add_argument("--langs", nargs="+", help="e.g. en zh")
    p.add_argument("--max-prompt-tokens", type=int, help="leave out longer prompts")
    p.add_argument("--best-of", type=int, default=1, help="Equal To with a LenVM: keep the best of K answers")
    p.add_argument(
        "--retries", type=int, help="Equal To with a LenVM: resample an end that is not natural up to R times"
    )

    p = command("tradeoff", "pass@1 vs mean length: tilting against a hard token budget", "tradeoff")
    p.add_argument("--gsm8k", default=tasks.DEFAULT_GSM8K, help="GSM8K test JSONL")
    p.add_argument("--no-gsm8k", action="store_true", help="built-in word problems only")
    p.add_argument("--gsm8k-problems", type=int, default=200)
    p.add_argument("--arithmetic-problems", type=int, default=100, help="per level")
    p.add_argument("--levels", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--betas", type=float, nargs="+", default=list(DEFAULT_BETAS))
    p.add_argument("--budgets", type=int, nargs="+", help="hard budgets (default: from the lengths)")

    p = command("predict", "prompt-boundary length prediction against two baselines", "predict")
    p.add_argument("--prompts", required=True, help="held-out prompts JSONL (with a 'domain' field)")
    p.add_argument("--train-rollouts", help="rollouts the baselines are fitted on")
    p.add_argument("--samples", type=int, default=64, help="completions per prompt")
    p.add_argument("--limit", type=int, help="first N prompts")

    p = command(
        "length-tokens", "tokens that push the length horizon (TD residuals)", "length_tokens", sampling=False
    )
    p.add_argument("--rollouts", required=True)
    p.add_argument("--threshold", type=float, default=0.01)
    p.add_argument("--min-count", type=int, default=3)
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--limit", type=int, help="first N completions")
    p.add_argument("--batch-size", type=int, default=8)

    p = command(
        "speed", "tokens/s: plain, generate, and guided decoding by LenVM kind", "speed", sampling=False
    )
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--candidates", type=int, nargs="+", default=[8, 16], help="k values")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--generate-batch-sizes", type=int, nargs="+", default=[8, 16])
    p.add_argument(
        "--methods",
        nargs="+",
        choices=speed.METHODS,
        help="default: all (plain always runs: the reference)",
    )

    p = command(
        "q-agreement",
        "Q-head candidate values against exact scoring",
        "q_agreement",
        lenvm=False,
        sampling=False,
    )
    p.add_argument("--exact", required=True, help="attached or standalone LenVM folder")
    p.add_argument("--q", required=True, help="q LenVM folder")
    p.add_argument("--rollouts", required=True, help="held-out rollouts JSONL")
    p.add_argument("--num-candidates", type=int, default=8)
    p.add_argument("--positions", type=int, default=16, help="positions per completion")
    p.add_argument("--held-out", action="store_true", help="only the prompts the q LenVM's training held out")
    p.add_argument("--limit", type=int, help="first N completions")
    p.add_argument("--seed", type=int, default=0)

    p = command("all", "every benchmark into one folder, with report.md", "all", sampling=False)
    p.add_argument("--quick", action="store_true", help="small settings: under 30 minutes on 2 CPU cores")
    p.add_argument("--train-rollouts", help="the --lenvm's training rollouts (baselines, length tokens)")
    p.add_argument("--data", default=lifebench.DEFAULT_DATA, help="LIFEBench JSONL")
    p.add_argument("--gsm8k", default=tasks.DEFAULT_GSM8K, help="GSM8K test JSONL")
    p.add_argument("--gsm8k-train", default=DEFAULT_GSM8K_TRAIN, help="GSM8K train JSONL")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_transformers()
    try:
        args.func(args)
    except InputError as err:
        print(f"lenvm: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        if err.errno == errno.ENOSPC:
            print(
                "lenvm: error: no space left on the device; finished files are intact and the "
                "same command resumes once space is freed",
                file=sys.stderr,
            )
            return 28
        raise
    except KeyboardInterrupt:
        print("lenvm: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
