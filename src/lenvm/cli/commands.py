"""The ``lenvm`` commands: one thin command per library entry point (:func:`lenvm.cli.main` runs
them).

Benchmarks declare their own subcommands (``lenvm.bench``); the flags that several commands share
are declared once (:mod:`lenvm.cli.options`).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import replace
from pathlib import Path
from typing import TextIO, cast

from lenvm.cli import interrupted, options
from lenvm.io import InputError, json_text
from lenvm.quoting import plain_field


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' warnings and progress bars (its own and the hub's) off while the command runs,
    and as they were after it: :func:`lenvm.cli.main` may run in a notebook's process."""
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hub_bars_disabled = hub_utils.are_progress_bars_disabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()  # the hub's too, set again below
        if hub_utils.are_progress_bars_disabled() != hub_bars_disabled:
            (hub_utils.disable_progress_bars if hub_bars_disabled else hub_utils.enable_progress_bars)()


@contextlib.contextmanager
def _plain_warnings() -> Iterator[None]:
    """lenvm's own warnings as one line each, like its errors (not a source location), while the
    command runs."""
    import warnings

    package = str(Path(__file__).resolve().parent.parent)
    default = warnings.formatwarning

    def format_warning(message, category, filename, lineno, line=None) -> str:
        if str(Path(filename).resolve()).startswith(package):
            return f"lenvm: warning: {message}\n"
        return default(message, category, filename, lineno, line)

    warnings.formatwarning = format_warning
    try:
        yield
    finally:
        warnings.formatwarning = default


def _gamma(text: str) -> float | None:
    if text == "auto":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"gamma must be 'auto' or a number, got {text!r}") from None


def _prompts_from_args(args) -> list:
    from lenvm.prompts import as_prompt, read_prompts

    kwargs = getattr(args, "chat_template_kwargs", None)
    if getattr(args, "prompts", None):
        if getattr(args, "image", None):
            raise InputError("--image goes with --prompt; a prompts file names its images itself")
        if kwargs is not None:
            raise InputError(
                "--chat-template-kwargs goes with --prompt; a prompts file gives each record's "
                "'chat_template_kwargs' itself"
            )
        return read_prompts(args.prompts)
    if getattr(args, "prompt", None) is not None:
        prompt = as_prompt(args.prompt, images=getattr(args, "image", None))
        return [prompt if kwargs is None else replace(prompt, chat_template_kwargs=kwargs)]
    raise InputError("give --prompt TEXT or --prompts FILE.jsonl")


def _load_lenvm(args, generator=None):
    """The LenVM of ``--lenvm``, attached to ``generator``, else to the generator ``--model`` names
    where the command has that flag (:func:`options.add_lenvm_generator`), else to its own."""
    from lenvm.model import LengthValueModel

    if generator is None and getattr(args, "lenvm_generator", None) is not None:
        from lenvm.hub import load_generator

        generator = load_generator(args.lenvm_generator, device=args.device, dtype=args.dtype)
    return LengthValueModel.from_pretrained(
        args.lenvm, generator=generator, device=args.device, dtype=args.dtype
    )


# -- commands ------------------------------------------------------------------------------


def cmd_rollout(args) -> None:
    from lenvm.rollouts import rollout

    summary = rollout(
        args.model,
        _prompts_from_args(args),
        args.out,
        n=args.n,
        sampling=options.sampling_from_args(args),
        batch_size=args.batch_size,
        backend=args.backend,
        base_url=args.base_url,
        api_model=args.api_model,
        api_key=args.api_key,
        device=args.device,
        dtype=args.dtype,
        vllm_args=args.vllm_args,
        progress=args.progress,
    )
    print(json_text(summary.to_dict(), indent=2, default=str, ensure_ascii=False))


def _without(argv: list[str], flags: tuple[str, ...]) -> list[str]:
    """``argv`` less the given flags and their values (``--flag V`` or ``--flag=V``)."""
    out, skip = [], False
    for token in argv:
        if skip:
            skip = False
        elif token in flags:
            skip = True
        elif not token.startswith(tuple(f + "=" for f in flags)):
            out.append(token)
    return out


def cmd_train(args) -> int | None:
    from lenvm import launch
    from lenvm.io import is_pipe
    from lenvm.rollouts import read_rollouts
    from lenvm.training import TrainConfig, is_main_process, train

    fields = TrainConfig.__dataclass_fields__
    config = TrainConfig(
        **{name: getattr(args, name) for name in fields if getattr(args, name, None) is not None}
    )
    if args.num_processes is not None and not args.accelerate_config:
        raise InputError("--num-processes goes with --accelerate-config")
    if args.accelerate_config and config.resolved().freeze_backbone:
        raise InputError(
            "--accelerate-config spreads fine-tuning a backbone (--kind standalone) over processes; a head "
            "on a frozen backbone trains in one process (every process would repeat the whole run)"
        )
    piped = [flag for flag, path in (("--rollouts", args.rollouts), ("--eval-rollouts", args.eval_rollouts))
             if path is not None and is_pipe(path)]  # fmt: skip
    if piped and args.accelerate_config:
        raise InputError(
            f"{piped[0]} is a pipe, which the processes --accelerate-config starts cannot read: "
            "save it to a file"
        )
    if "--rollouts" in piped and args.stream:
        raise InputError("--stream reads the rollouts afresh on every pass: give a file, not a pipe")
    if not launch.launched():  # the processes it starts find --out as it was checked here
        _check_out(args.out, args.overwrite, "training")
    if args.accelerate_config and not launch.launched():
        argv = _without(args.argv, ("--accelerate-config", "--num-processes"))
        return launch.relaunch(args.accelerate_config, argv, args.num_processes)
    # A pipe is read once: its records are held for the generator's name and every pass.
    rollouts = read_rollouts(args.rollouts) if "--rollouts" in piped else args.rollouts
    if args.base is None:
        args.base = _rollouts_generator(rollouts, args.rollouts)
    result = train(
        rollouts,
        args.base,
        args.out,
        config,
        progress=args.progress,
        eval_rollouts=args.eval_rollouts,
        device=args.device,
        dtype=args.dtype,
        overwrite=args.overwrite,
    )
    if result.metrics and is_main_process():
        summary = {
            "out": str(result.path),
            "gamma": result.gamma,
            "metrics": result.metrics,
            "data": result.data.to_dict(),
            "seconds_this_run": round(result.seconds_this_run, 1),
            "train_tokens_per_second": round(result.tokens_per_second),
        }
        print(json_text(summary, indent=2, ensure_ascii=False))
    launch.leave_process_group()  # after the main process has written the LenVM
    return None


def _rollouts_generator(rollouts: str | list[dict], name: str) -> str:
    """The generator that the first record of ``rollouts`` (a file, or its records read already)
    names: what they were sampled from."""
    from lenvm.rollouts import iter_rollouts
    from lenvm.training import is_main_process

    first = next(iter(iter_rollouts(rollouts) if isinstance(rollouts, str) else rollouts), None)
    if first is None:
        raise InputError(f"{name}: no rollout records to train on")
    if not first.get("generator"):
        raise InputError(
            f"{name}: the rollouts name no generator; give the model they were sampled from as --base"
        )
    if is_main_process():
        print(
            f"base: {first['generator']} (the generator the rollouts name; --base to choose)", file=sys.stderr
        )
    return first["generator"]


def _check_out(out: str | None, overwrite: bool, writes: str, source: str | None = None) -> None:
    """A command that ``writes`` a whole new LenVM folder at ``out``: refuse to replace anything but
    a LenVM, and a LenVM (with any end head and calibration trained for it) only when asked to.
    Writing over ``source``, the LenVM the command reads, is its documented in-place update."""
    from lenvm.io import check_writable
    from lenvm.model import refuse_to_replace

    # Before minutes of work, not after; without --out, the LenVM read (source, given) is updated.
    check_writable(cast(str, out if out is not None else source))
    if out is None:
        return
    path = Path(out)
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        return
    if source is not None and Path(source).exists() and path.resolve() == Path(source).resolve():
        return
    refuse_to_replace(path, writes)
    if not overwrite:
        raise InputError(
            f"{out} already holds a LenVM (with its end head and calibration, if any): pass --overwrite "
            "to replace it, or choose another --out"
        )


def cmd_predict(args) -> None:
    if args.json and args.out:
        raise InputError("--out writes the JSON lines to a file, --json to the terminal: give one of them")
    prompts = _prompts_from_args(args)  # a bad prompts file fails before any model loads
    lenvm = _load_lenvm(args)
    if args.out:
        from lenvm.batch_predict import predict_file

        stats = predict_file(lenvm, prompts, args.out, batch_size=args.batch_size, progress=args.progress)
        print(
            f"{stats.predicted} prompts predicted in {stats.seconds:.2f} s "
            f"({stats.prompts_per_second:.1f} prompts/s at batch {stats.batch_size}), "
            f"{stats.skipped} already in {args.out}",
            file=sys.stderr,
        )
        return
    encoded = lenvm.encode_prompts(prompts)
    clock = time.perf_counter()
    values = lenvm.values_of_prompts(encoded, args.batch_size, progress=args.progress and len(prompts) > 1)
    seconds = time.perf_counter() - clock
    lengths = lenvm.lengths_from_values(values)
    for prompt, e, length in zip(prompts, encoded, lengths, strict=True):
        if args.json:  # the fields of a --out line that describe the prediction
            fields = {"id": prompt.id, "predicted_length": round(length, 2), "prompt_tokens": len(e.ids)}
            print(json_text(fields, ensure_ascii=False))
        else:
            print(f"{plain_field(prompt.id, sys.stdout.encoding)}\t{length:.1f}")
    if len(prompts) > 1:
        print(
            f"{len(prompts)} prompts in {seconds:.2f} s ({len(prompts) / seconds:.1f} prompts/s)",
            file=sys.stderr,
        )


def cmd_calibrate(args) -> None:
    from lenvm.calibration import fit_on_rollouts, length_map
    from lenvm.model import save_config

    _check_out(args.out, args.overwrite, "calibrating", source=args.lenvm)
    lenvm = _load_lenvm(args)
    fit = fit_on_rollouts(lenvm, args.rollouts, batch_size=args.batch_size, progress=args.progress)
    lenvm.config.calibration = fit.calibration.to_dict()
    out = save_config(args.lenvm, lenvm.config, args.out)
    print(f"calibrated on {fit.rollouts} rollouts ({fit.states} states); wrote {out}", file=sys.stderr)
    low, high = fit.seen
    print(
        f"squared error of the values against what the answers did: {fit.mse_before:.4f} before, "
        f"{fit.mse_after:.4f} after (on these rollouts)"
    )
    print(f"tokens left, as the head says -> as its answers went on (the head said {low:.1f} to {high:.1f})")
    shown: list[float] = [n for n in (2, 4, 8, 16, 32, 64, 128, 256) if low <= n <= high] or [low, high]
    for said, went in length_map(fit.calibration, lenvm.gamma, shown):
        print(f"{said:8.1f} -> {went:6.1f}")


def cmd_train_end_head(args) -> None:
    from lenvm.end_head import train_end_head
    from lenvm.model import END_HEAD_NAME, save_config
    from lenvm.rollouts import read_rollouts

    _check_out(args.out, args.overwrite, "training the end head", source=args.lenvm)
    lenvm = _load_lenvm(args)
    records = read_rollouts(args.rollouts)
    held = read_rollouts(args.eval_rollouts) if args.eval_rollouts else None
    figures = train_end_head(
        lenvm, records, held, bar=args.natural_eos, epochs=args.epochs, lr=args.lr, progress=args.progress
    )
    out = save_config(args.lenvm, lenvm.config, args.out, {END_HEAD_NAME: lenvm.end_head.state_dict()})
    print(f"trained the end head on {int(figures['states'])} states; wrote {out}", file=sys.stderr)
    if "eval_mae" in figures:
        print(
            f"held-out tokens to the next natural end: mean abs error {figures['eval_mae']:.1f} "
            f"(the training median alone: {figures['eval_mae_constant']:.1f}) over "
            f"{int(figures['eval_states'])} states"
        )


def cmd_values(args) -> None:
    from lenvm.io import write_text
    from lenvm.values_view import render_html, token_values

    if args.html == "":
        raise InputError("--html needs a file name")
    if args.html:
        from lenvm.io import check_writable

        check_writable(args.html)  # a device or pipe is refused before the work
    if args.html and Path(args.html).is_file():
        with open(args.html, "rb") as fh:
            if not fh.read(64).lstrip().lower().startswith(b"<!doctype html"):
                raise InputError(f"--html {args.html}: exists and is not an HTML page; it is left as it is")
    prompt, completion, finished, record = _answer_to_value(args)
    lenvm = _load_lenvm(args)
    if record is not None:  # its token ids mean something only to its generator's tokenizer
        from lenvm.training_data import check_prompt_tokens

        fix = "show it with a LenVM of that generator"
        check_prompt_tokens(record, (args.record or 1) - 1, lenvm.tokenizer, lenvm.config.base_model, fix)
    trace = token_values(lenvm, prompt, completion, finished=finished)
    if args.html:
        write_text(args.html, render_html(trace))
        print(f"wrote {args.html}", file=sys.stderr)
    print(json.dumps(trace.to_dict(), ensure_ascii=False))  # one line, like generate --json


def _answer_to_value(args) -> tuple:
    """``(prompt, completion, finished, record)`` for ``lenvm values``: a rollout record (its own
    token ids, the prompt's too unless it has images, and its ending), or a prompt with the
    completion's text (record None)."""
    from lenvm.io import numbered_jsonl
    from lenvm.rollouts import record_problem, record_prompt

    if args.rollouts is not None:
        if (
            args.prompt is not None
            or args.completion is not None
            or args.unfinished
            or args.image
            or args.chat_template_kwargs is not None
        ):
            raise InputError(
                "--rollouts takes the prompt, completion and ending from its record: drop --prompt, --image, "
                "--chat-template-kwargs, --completion and --unfinished"
            )
        wanted = args.record or 1
        for number, (lineno, record) in enumerate(numbered_jsonl(args.rollouts), start=1):
            if number == wanted:
                if (problem := record_problem(record)) is not None:
                    raise InputError(f"{args.rollouts}:{lineno}: bad rollout record: {problem}")
                prompt = record_prompt(record)
                ids = record["prompt_token_ids"] if not prompt.images else prompt  # images: encoded again
                return ids, record["completion_token_ids"], record["finish_reason"] == "stop", record
        raise InputError(f"{args.rollouts} has fewer than {wanted} records")
    if args.record is not None:
        raise InputError("--record picks a record of --rollouts FILE")
    if args.prompt is None or args.completion is None:
        raise InputError("give --prompt and --completion (text, or @FILE), or --rollouts FILE [--record N]")
    completion = args.completion
    if completion.startswith("@"):
        completion = _completion_from_file(completion)
    [prompt] = _prompts_from_args(args)
    return prompt, completion, not args.unfinished, None


def _completion_from_file(arg: str) -> str:
    """The text of ``--completion @FILE`` (``@-``: the standard input) without its final line
    ending: an editor ends every file with one, and it is no part of the answer."""
    from lenvm.io import is_pipe

    if arg == "@-":
        data = sys.stdin.buffer.read()
    else:
        path = Path(options.path(arg[1:]))
        if path.is_dir():
            raise InputError(f"--completion {arg}: a folder, not a file")
        if not (path.is_file() or is_pipe(path)):
            raise InputError(f"--completion {arg}: no such file")
        data = path.read_bytes()
    try:  # a byte-order mark is no part of the answer
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise InputError(f"--completion {arg}: not UTF-8 text (byte {err.start + 1})") from None
    return text.removesuffix("\r\n") if text.endswith("\r\n") else text.removesuffix("\n")


def _control(args):
    from lenvm.decoding import Control

    # Control says which kinds take these
    extra = {
        "rule": args.rule,
        "best_of": args.best_of,
        "retries": args.retries,
        "hard_cap_slack": args.hard_cap_slack,
    }
    if args.equal_to is not None:
        return Control("equal_to", target=args.equal_to, **extra)
    if args.at_most is not None:
        return Control("at_most", target=args.at_most, **extra)
    if args.at_least is not None:
        return Control("at_least", target=args.at_least, **extra)
    if args.tilt is not None:
        return Control("tilt", beta=args.tilt, **extra)
    shaping = {
        "--rule": args.rule != "ours",
        "--best-of": args.best_of != 1,
        "--retries": args.retries is not None,
        "--hard-cap-slack": args.hard_cap_slack is not None,
    }
    given = [flag for flag, set_ in shaping.items() if set_]
    if given:
        raise InputError(
            f"{', '.join(given)} shape a length control: add --equal-to, --at-most, --at-least or --tilt"
        )
    return Control()


def cmd_generate(args) -> None:
    from dataclasses import replace

    from lenvm.decoding import Engine, Request, Result, SamplingParams
    from lenvm.decoding.params import RequestError
    from lenvm.hub import load_generator
    from lenvm.prompts import Prompt
    from lenvm.rollouts import derive_seed

    control = _control(args)
    if control.active and not args.lenvm:
        raise InputError("a length control needs a LenVM (--lenvm)")
    prompts = _prompts_from_args(args)
    model, tokenizer = load_generator(args.model, device=args.device, dtype=args.dtype)
    lenvm = _load_lenvm(args, generator=(model, tokenizer)) if args.lenvm else None
    sampling = options.sampling_from_args(args, lenvm.config.sampling if lenvm is not None else None)
    engine = Engine(model, tokenizer, lenvm=lenvm, num_candidates=args.num_candidates)

    def prompt_sampling(prompt: Prompt) -> SamplingParams:
        # Each prompt's seed derives from --seed as a rollout's first sample's does (the same
        # prompt twice in a file gets two draws, and one prompt's answer is its rollout's sample 0).
        if sampling.seed is None:
            return sampling
        return replace(sampling, seed=derive_seed(sampling.seed, prompt.id, 0))

    requests = [Request(p, prompt_sampling(p), control=control, return_values=args.values) for p in prompts]
    # Each answer is printed, in prompt order, once it and those before it are done: a long batch
    # shows its work as it goes (and an interrupted one keeps what was printed).
    done: dict[int, Result] = {}
    printed = 0
    try:
        with _printing_beside_the_bar(args.progress) as beside_the_bar:
            for index, result in engine.stream(requests, batch_size=args.batch_size, progress=args.progress):
                done[index] = result
                if printed not in done:
                    continue
                with beside_the_bar():
                    while printed in done:
                        _print_generated(args, prompts[printed], done.pop(printed))
                        printed += 1
    except RequestError as err:  # named as predict and rollout name a prompt
        raise InputError(f"prompt {err.key + 1} (id {prompts[err.key].id!r}): {err.reason}") from None


@contextlib.contextmanager
def _printing_beside_the_bar(bar_shown: bool) -> Iterator[Callable[[], AbstractContextManager[None]]]:
    """Made before the progress bar (which writes to the stderr it finds then), it gives a context
    in which printed lines start lines of their own beside the bar (with stdout on the same terminal
    or in the same log, a result would go on the bar's line): in a terminal the bar is cleared and
    drawn again below them; elsewhere, where a bar's redraws pile up on one line that nothing ends,
    that line is ended, only if the bar drew on it since the last lines (else a blank line would
    stand between results that came faster than the bar redraws)."""
    if not bar_shown:
        yield contextlib.nullcontext
    elif sys.stderr.isatty():
        from tqdm.auto import tqdm

        yield lambda: tqdm.external_write_mode(file=sys.stdout)
    else:
        tracking = _LineTracking(sys.stderr)
        stderr = cast(TextIO, tracking)  # a text stream by delegation (_LineTracking.__getattr__)

        @contextlib.contextmanager
        def after_the_bar_line() -> Iterator[None]:
            if tracking.line_open:
                print(file=stderr, flush=True)
            yield

        with contextlib.redirect_stderr(stderr):
            yield after_the_bar_line


class _LineTracking:
    """A text stream that knows whether its last write left a line open (a progress bar's draw)."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self.line_open = False

    def write(self, text: str) -> int:
        if text:
            self.line_open = not text.endswith("\n")
        return self._stream.write(text)

    def __getattr__(self, name: str) -> object:  # the rest of a stream (flush, isatty, encoding)
        return getattr(self._stream, name)


def _print_generated(args, prompt, result) -> None:
    if args.json or args.prompts:
        record = {
            "id": prompt.id,
            "text": result.text,
            "token_ids": result.token_ids,
            "num_tokens": result.num_tokens,
            "finish_reason": result.finish_reason,
            "mean_logprob": round(result.mean_logprob, 4),
            "eos_prob": result.eos_prob,
            "retries": result.retries,
            "decoded_tokens": result.decoded_tokens,
        }
        if args.values:
            record["values"] = result.values
        print(json.dumps(record, ensure_ascii=False), flush=True)
        return
    print(result.text, flush=True)
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


def cmd_serve(args) -> None:
    try:
        from lenvm.serve import ServerSettings, serve
    except ImportError as err:
        raise InputError(f'lenvm serve needs the serving extra: pip install "lenvm[serve]" ({err})') from None
    from lenvm.decoding import Engine
    from lenvm.hub import load_generator
    from lenvm.serve.app import check_address, key_problem

    check_address(args.host, args.port)  # before the model loads
    # --api-key "" (a script's unset variable) is refused, not a server without a key.
    if args.api_key is not None:
        source, api_key = "--api-key", args.api_key
    else:
        source, api_key = "LENVM_API_KEY", os.environ.get("LENVM_API_KEY") or None
    if api_key is not None and (why := key_problem(api_key)) is not None:
        raise InputError(f"the API key of {source} {why}")
    settings = ServerSettings(
        served_model_name=args.served_model_name or args.model,
        api_key=api_key,
        batch_size=args.batch_size,
        max_waiting=args.max_queue,
        max_streams=args.max_streams,
        max_body_bytes=args.max_body_bytes,
        shutdown_timeout=args.shutdown_timeout,
        stream_stall_timeout=args.stream_stall_timeout,
        default_chat_template_kwargs=args.default_chat_template_kwargs or {},
    )
    model, tokenizer = load_generator(args.model, device=args.device, dtype=args.dtype)
    lenvm = _load_lenvm(args, generator=(model, tokenizer)) if args.lenvm else None
    engine = Engine(model, tokenizer, lenvm=lenvm, num_candidates=args.num_candidates)
    serve(engine, settings, host=args.host, port=args.port, log_level=args.log_level)


def cmd_models(args) -> None:
    from lenvm import hub

    if args.action == "list":
        for m in hub.list_models():
            state = "prepared" if m["prepared"] else "not prepared"
            fields = (str(m["name"]), state, str(m["description"]), str(m["path"]))
            print("\t".join(plain_field(field, sys.stdout.encoding) for field in fields))
    else:
        print(plain_field(str(hub.prepare(args.name)), sys.stdout.encoding))


def cmd_demo(args) -> None:
    from lenvm.demo import DemoConfig, run_demo

    config = DemoConfig(
        out=Path(args.out),
        prompts=args.num_prompts,
        n=args.n,
        gsm8k=args.gsm8k_problems,
        gsm8k_path=args.gsm8k,
        generated=args.generated,
        generated_zh=args.generated_zh,
        mix_n=args.mix_n,
        eval_samples=args.eval_samples,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        loss=args.loss,
        end_head=args.end_head,
        model=args.model,
        seed=args.seed,
        device=args.device,
        dtype=args.dtype,
        backend=args.backend,
        progress=args.progress,
    )
    run_demo(config)


def cmd_bench(args) -> None:
    """Each ``lenvm bench`` subcommand runs its module's ``main``; then its table is shown."""
    args.bench_module.main(args)
    table = Path(args.out) / args.bench_module.TABLE
    if table.is_file():
        print(table.read_text(encoding="utf-8"))


# -- parser --------------------------------------------------------------------------------


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The ``lenvm`` parser. Given the command line, only the chosen command's options are built:
    those of train, demo and the benchmarks need torch, whose import takes seconds that ``--help``
    and a usage error should not wait for."""
    from lenvm import __version__

    chosen = [a for a in argv if not a.startswith("-")][:2] if argv is not None else None

    def wanted(*command: str) -> bool:
        return chosen is None or chosen[: len(command)] == list(command)

    parser = options.Parser(
        prog="lenvm",
        description="Length Value Models: predict and control how long a language model will talk.",
    )
    parser.add_argument("--version", action="version", version=f"lenvm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("rollout", help="sample n completions per prompt from a generator")
    options.add_model(p)
    p.add_argument(
        "--prompts",
        type=options.path,
        required=True,
        help="JSONL ('-': standard input): {'prompt': ...} (optionally with 'images': [paths]) or "
        "{'messages': [...]}",
    )
    p.add_argument(
        "--out", type=options.path, required=True, help="rollouts JSONL (appended; a rerun resumes)"
    )
    p.add_argument("--n", type=int, default=4, help="completions per prompt")
    options.add_sampling(p, seed_help="every completion's seed derives from it (default 0)")
    p.add_argument(
        "--batch-size",
        type=options.positive_int,
        default=16,
        help="completions decoded at once (requests in flight)",
    )
    p.add_argument(
        "--backend",
        choices=["hf", "engine", "vllm", "openai", "auto"],
        default="hf",
        help="hf (or engine): our engine; vllm: vLLM in this process (the [vllm] extra); openai: a server at "
        "--base-url; auto: vllm where installed, else hf (a resumed file keeps its backend)",
    )
    p.add_argument(
        "--vllm-args",
        type=options.json_object,
        help="--backend vllm: vllm.LLM arguments as a JSON object, e.g. '{\"max_model_len\": 4096}'",
    )
    p.add_argument("--base-url", help="OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--api-model", help="model name on the server (default: --model)")
    p.add_argument("--api-key", help="key for --base-url (default: the OPENAI_API_KEY environment variable)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=cmd_rollout)

    p = sub.add_parser("train", help="train a LenVM on rollouts")
    if wanted("train"):
        _train_arguments(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "predict",
        help="predict total answer length from the prompt alone",
        description="Predict the total length of a prompt's answer, in tokens, from the prompt alone. "
        "Prints a line per prompt: its id, a tab and the length; an id that holds a tab, a line break "
        "or another control character (or a character stdout's encoding lacks), or starts with a double "
        'quote, is printed as a JSON string ("a\\tb"). '
        "--json and --out give JSON lines instead.",
    )
    p.add_argument("--lenvm", type=options.path, required=True, help="LenVM folder")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--prompt", help="one prompt (a user message; the chat template is applied)")
    group.add_argument("--prompts", type=options.path, help="JSONL file of prompts ('-': standard input)")
    options.add_prompt_extras(p)
    p.add_argument(
        "--out",
        type=options.path,
        help="write one JSON line per prompt here, as it goes (a rerun predicts only what is missing)",
    )
    p.add_argument("--batch-size", type=options.positive_int, default=32, help="prompts per forward")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    options.add_lenvm_generator(p)
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    options.add_device(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser(
        "calibrate",
        help="fit a monotone map from a LenVM's values to the lengths realized on held-out rollouts",
    )
    p.add_argument("--lenvm", type=options.path, required=True, help="LenVM folder")
    p.add_argument(
        "--rollouts",
        type=options.path,
        required=True,
        help="rollouts JSONL of the LenVM's generator on prompts the LenVM was not trained on "
        "(its training's --eval-rollouts, or new ones)",
    )
    p.add_argument("--out", type=options.path, help="write the calibrated LenVM here (default: in place)")
    p.add_argument("--overwrite", action="store_true", help="replace the LenVM that --out holds, if any")
    p.add_argument("--batch-size", type=options.positive_int, default=8, help="rollouts per forward")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    options.add_lenvm_generator(p)
    options.add_device(p)
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser(
        "train-end-head",
        help="train an attached LenVM's end head: tokens until the generator could next end naturally",
    )
    p.add_argument("--lenvm", type=options.path, required=True, help="attached LenVM folder")
    p.add_argument(
        "--rollouts", type=options.path, required=True, help="rollouts JSONL of the LenVM's generator"
    )
    p.add_argument(
        "--eval-rollouts",
        type=options.path,
        help="rollouts of other prompts, to report the held-out error on",
    )
    p.add_argument(
        "--out", type=options.path, help="write the LenVM with its end head here (default: in place)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace the LenVM that --out holds, if any")
    p.add_argument(
        "--natural-eos", type=float, default=None,
        help="the generator's EOS probability that counts as a natural end (default: the controls' 0.05)",
    )  # fmt: skip
    p.add_argument("--epochs", type=int, default=30, help="passes over the training states")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    options.add_lenvm_generator(p)
    options.add_device(p)
    p.set_defaults(func=cmd_train_end_head)

    p = sub.add_parser("values", help="per-token values and TD residuals of a completion")
    p.add_argument("--lenvm", type=options.path, required=True, help="LenVM folder")
    p.add_argument("--prompt", help="the prompt (a user message)")
    options.add_prompt_extras(p)
    p.add_argument(
        "--completion",
        help="the answer to value, token by token (@FILE: read it from FILE, less its final line "
        "ending; @-: from the standard input)",
    )
    p.add_argument("--unfinished", action="store_true", help="the completion was cut (no EOS)")
    p.add_argument(
        "--rollouts",
        type=options.path,
        help="a rollouts JSONL file: value one of its records, with the generator's own token ids "
        "(instead of --prompt and --completion)",
    )
    p.add_argument(
        "--record", type=options.positive_int, help="with --rollouts: which record (default 1: the first)"
    )
    p.add_argument("--html", type=options.path, help="also write a self-contained HTML view here")
    options.add_lenvm_generator(p)
    options.add_device(p)
    p.set_defaults(func=cmd_values)

    p = sub.add_parser("generate", help="generate text, optionally steered to a length by a LenVM")
    options.add_generator(p)
    p.add_argument("--lenvm", type=options.path, help="LenVM folder (needed for a length control)")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--prompt", help="one prompt (a user message; the chat template is applied)")
    group.add_argument(
        "--prompts",
        type=options.path,
        help="JSONL file ('-': standard input); prints one JSON line per prompt",
    )
    options.add_prompt_extras(p)
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
    p.add_argument(
        "--rule",
        choices=["ours", "paper"],
        default="ours",
        help="ours (default): the generator conditioned on the control; paper: the paper's one-hot "
        "rules (--at-most/--at-least then take the shortest/longest candidate, their N ignored)",
    )
    p.add_argument(
        "--hard-cap-slack",
        type=int,
        help="--equal-to, and --at-most under --rule paper: force EOS at N + slack tokens (default: none; "
        "--at-most under our rule stops at N)",
    )
    p.add_argument(
        "--best-of",
        type=int,
        default=1,
        help="--equal-to: sample K answers, keep the natural ending closest to N (K times the cost)",
    )
    p.add_argument(
        "--retries",
        type=int,
        help="--equal-to, --at-most, --at-least: resample the end of an answer that does not end "
        "naturally up to R times (default: Control's default for the rule, 0 for paper)",
    )
    options.add_sampling(
        p,
        seed_help="every prompt's seed derives from it (default: a fresh random stream each)",
        fits_context=True,
    )
    options.add_decoding(p, batch_size=8)
    p.add_argument("--values", action="store_true", help="also print the value after each token")
    p.add_argument(
        "--json", action="store_true", help="print the result as JSON (text, token ids, finish reason, ...)"
    )
    p.add_argument(
        "--no-progress", dest="progress", action="store_false", help="no progress bar (tokens decoded so far)"
    )
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("serve", help="an OpenAI-compatible server with length control, prediction and values")
    options.add_generator(p)
    p.add_argument(
        "--lenvm",
        type=options.path,
        help="LenVM folder (needed for length controls and the length endpoints)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=options.port, default=8000, help="port to listen on")
    p.add_argument("--served-model-name", help="the model name clients send (default: --model as given)")
    p.add_argument(
        "--api-key", help="require 'Authorization: Bearer KEY' on /v1 routes (default: $LENVM_API_KEY if set)"
    )
    options.add_decoding(p, batch_size=16)
    p.add_argument(
        "--max-queue",
        type=options.non_negative_int,
        default=256,
        help="answers that may wait for a row (then 429)",
    )
    p.add_argument(
        "--max-streams",
        type=options.positive_int,
        default=64,
        help="streaming responses open at once (then 429)",
    )
    p.add_argument(
        "--max-body-bytes", type=options.positive_int, default=1 << 20, help="largest request body (then 413)"
    )
    p.add_argument(
        "--shutdown-timeout",
        type=options.non_negative_float,
        default=30.0,
        help="on SIGTERM, seconds that requests in flight get to finish before an error answers them "
        "(inf: no limit)",
    )
    p.add_argument(
        "--stream-stall-timeout",
        type=options.positive_float,
        default=60.0,
        help="seconds a stream's client may read nothing while an event waits to be sent; then the "
        "stream is ended as if the client had gone away (inf: no limit)",
    )
    p.add_argument(
        "--default-chat-template-kwargs",
        type=options.json_object,
        metavar="JSON",
        help="the chat template's variables for every request, under its own chat_template_kwargs, a "
        "JSON object (e.g. '{\"enable_thinking\": false}'), as vLLM's option",
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="server log level",
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("models", help="list or prepare built-in models")
    msub = p.add_subparsers(dest="action", required=True)
    msub.add_parser("list", help="the built-in models and whether each is prepared")
    prep = msub.add_parser("prepare", help="convert a built-in model once into the local cache")
    prep.add_argument("name", help="a built-in model's name (see lenvm models list)")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("demo", help="end to end on the built-in model: rollouts, training, evaluation")
    if wanted("demo"):
        _demo_arguments(p)
    p.set_defaults(func=cmd_demo)

    _add_bench_parser(sub, wanted)
    return parser


def _train_arguments(p: argparse.ArgumentParser) -> None:
    from lenvm.launch import CONFIGS
    from lenvm.losses import AGGREGATIONS, LOSSES
    from lenvm.model import KINDS
    from lenvm.training import TrainConfig

    p.add_argument(
        "--rollouts",
        type=options.path,
        required=True,
        help="rollouts JSONL (lenvm rollout) or a datasets folder",
    )
    p.add_argument(
        "--eval-rollouts",
        type=options.path,
        help="held-out rollouts of other prompts to evaluate on (then --eval-fraction is not used)",
    )
    options.add_model(
        p,
        "--base",
        help="generator (attached, q) or backbone (standalone); default: the generator the rollouts name",
        default=None,
    )
    p.add_argument("--out", type=options.path, required=True, help="folder to write the LenVM to")
    p.add_argument("--overwrite", action="store_true", help="replace the LenVM that --out holds, if any")
    p.add_argument(
        "--kind",
        choices=KINDS,
        default=TrainConfig.kind,
        help="attached: a head on the generator's frozen hidden states (default); standalone: a "
        "backbone of its own; q: a length Q-head over every next token",
    )
    p.add_argument("--gamma", type=_gamma, help="'auto' (p99 rule, default) or a number")
    p.add_argument(
        "--truncated",
        choices=["bootstrap", "drop"],
        default=TrainConfig.truncated,
        help="completions cut at max_new_tokens: bootstrap their tail from the LenVM (default) or drop them",
    )
    p.add_argument(
        "--eval-fraction", type=float, default=TrainConfig.eval_fraction, help="share of prompts held out"
    )
    p.add_argument(
        "--freeze-backbone", action="store_const", const=True, help="standalone: train the head only"
    )
    p.add_argument("--epochs", type=int, help="default: 30 for a head, 2 for fine-tuning")
    p.add_argument("--lr", type=float, help="default: 1e-3 for a head, 2e-5 for fine-tuning")
    p.add_argument(
        "--batch-tokens", type=int, default=TrainConfig.batch_tokens, help="head training: positions per step"
    )
    p.add_argument(
        "--batch-size",
        type=options.positive_int,
        default=TrainConfig.batch_size,
        help="fine-tuning: sequences per process",
    )
    p.add_argument(
        "--grad-accum",
        type=int,
        default=TrainConfig.grad_accum,
        help="fine-tuning: batches per optimizer step",
    )
    p.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        help="bf16 mixed precision (default: where the hardware computes bf16 natively: GPUs that have "
        "it, CPUs with AVX-512 BF16 or AMX; float32 elsewhere)",
    )
    p.add_argument(
        "--gradient-checkpointing",
        action="store_const",
        const=True,
        help="fine-tuning: recompute activations in the backward pass (less memory, ~30%% more compute)",
    )
    targets = p.add_argument_group("targets and loss")
    targets.add_argument(
        "--lam",
        type=float,
        default=TrainConfig.lam,
        help="TD(lambda) targets bootstrapping from the LenVM being trained; 1 = Monte-Carlo (default)",
    )
    targets.add_argument(
        "--loss",
        choices=LOSSES,
        default=TrainConfig.loss,
        help="value regression loss (default: mse, the paper's)",
    )
    targets.add_argument(
        "--huber-delta",
        type=float,
        default=TrainConfig.huber_delta,
        help="--loss huber: where the loss turns linear, in value space (errors never reach 1)",
    )
    targets.add_argument(
        "--relative-loss-weight",
        type=float,
        default=TrainConfig.relative_loss_weight,
        help="add this times |predicted - target| / target remaining length, in tokens (default 0: off)",
    )
    targets.add_argument(
        "--prompt-weight",
        type=float,
        default=TrainConfig.prompt_weight,
        help="loss weight of each completion's first state, the one a prediction from the prompt "
        "reads (default 1: one state like any other)",
    )
    targets.add_argument(
        "--aggregation",
        choices=AGGREGATIONS,
        default=TrainConfig.aggregation,
        help="how per-token losses make a batch's loss (default: token-mean, the paper's)",
    )
    scale = p.add_argument_group("scale")
    scale.add_argument(
        "--stream",
        action=argparse.BooleanOptionalAction,
        help="read the rollouts afresh on each pass instead of loading them (default: for files over "
        "256 MiB and datasets folders)",
    )
    scale.add_argument(
        "--shuffle-buffer",
        type=int,
        default=TrainConfig.shuffle_buffer,
        help="fine-tuning a stream: completions held for shuffling",
    )
    scale.add_argument(
        "--checkpoint-every",
        type=int,
        default=TrainConfig.checkpoint_every,
        help="fine-tuning: optimizer steps between checkpoints and held-out evaluations",
    )
    scale.add_argument(
        "--features-cache",
        type=options.path,
        metavar="DIR",
        help="head training: keep the hidden states here and reuse them in later runs on the same data",
    )
    scale.add_argument(
        "--accelerate-config",
        type=options.path,
        metavar="NAME_OR_PATH",
        help=f"run under accelerate launch with this configuration ({', '.join(CONFIGS)}, or a YAML file)",
    )
    scale.add_argument(
        "--num-processes",
        type=int,
        help="--accelerate-config: processes to start (default: one per visible GPU, else 1)",
    )
    p.add_argument(
        "--head-hidden-size", type=int, help="the value head's hidden width (default: the backbone's)"
    )
    p.add_argument(
        "--feature-layer",
        type=int,
        help="the backbone layer the head reads (-1: the last; default: 60%% depth for attached "
        "and q heads, the last for standalone)",
    )
    p.add_argument("--max-length", type=int, help="drop sequences longer than this")
    p.add_argument(
        "--seed", type=int, default=TrainConfig.seed, help="held-out split, initialisation and order"
    )
    p.add_argument(
        "--no-progress", dest="progress", action="store_false", help="no progress bars or held-out lines"
    )


def _demo_arguments(p: argparse.ArgumentParser) -> None:
    from lenvm.demo import DemoConfig
    from lenvm.losses import LOSSES

    p.add_argument(
        "--out", type=options.path, default=str(DemoConfig.out), help="folder for everything the demo writes"
    )
    options.add_model(p)
    p.add_argument(
        "--num-prompts", type=int, default=DemoConfig.prompts, help="built-in prompts (10%% held out)"
    )
    p.add_argument("--n", type=int, default=DemoConfig.n, help="completions per built-in training prompt")
    p.add_argument(
        "--gsm8k",
        type=options.path,
        default=DemoConfig.gsm8k_path,
        help="GSM8K train JSONL for the training mix",
    )
    p.add_argument(
        "--gsm8k-problems", type=int, default=DemoConfig.gsm8k, help="GSM8K training problems (0: none)"
    )
    p.add_argument(
        "--generated", type=int, default=DemoConfig.generated,
        help="generated writing / QA / reasoning prompts (0: none)",
    )  # fmt: skip
    p.add_argument(
        "--generated-zh", type=int, default=DemoConfig.generated_zh,
        help="generated prompts of the same kinds in Chinese (default 0: none)",
    )  # fmt: skip
    p.add_argument(
        "--mix-n", type=int, default=DemoConfig.mix_n, help="completions per GSM8K or generated prompt"
    )
    p.add_argument(
        "--eval-samples",
        type=int,
        default=DemoConfig.eval_samples,
        help="completions per held-out prompt (their mean is the ground truth)",
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=DemoConfig.max_new_tokens,
        help="longest rollout (longer ones are cut)",
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=DemoConfig.temperature,
        help="the generator's sampling temperature",
    )
    p.add_argument(
        "--loss", choices=LOSSES, default=DemoConfig.loss,
        help="the head's training loss (default bce; mse is the paper's)",
    )  # fmt: skip
    p.add_argument(
        "--no-end-head", dest="end_head", action="store_false",
        help="skip the end head (where the generator could next end) that target rules wrap up with",
    )  # fmt: skip
    p.add_argument(
        "--seed", type=int, default=DemoConfig.seed, help="prompts, held-out split, sampling and training"
    )
    p.add_argument(
        "--backend",
        choices=["auto", "hf", "engine", "vllm"],
        default=DemoConfig.backend,
        help="what samples the rollouts: auto (default) takes vLLM where it is installed (it is "
        "faster), else our engine (hf)",
    )
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def _add_bench_parser(sub, wanted) -> None:
    import importlib

    from lenvm.bench import COMMANDS

    bench = sub.add_parser("bench", help="the paper's experiments, speed and Q-head agreement")
    bsub = bench.add_subparsers(dest="bench", required=True)
    for command, help_, module_name in COMMANDS:
        p = bsub.add_parser(command, help=help_)
        if not wanted("bench", command):
            continue
        module = importlib.import_module(module_name)
        p.add_argument(
            "--out",
            type=options.path,
            default="results/" + command.replace("-", "_"),
            help="results folder (a rerun resumes)",
        )
        model_flag = getattr(module, "MODEL_FLAG", ...)  # Ellipsis: a generator, the LenVM's by default
        if model_flag is ...:
            options.add_generator(p)
        elif model_flag is not None:
            options.add_model(p, default=model_flag[0], help=model_flag[1])
        p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
        module.add_arguments(p)
        p.set_defaults(func=cmd_bench, bench_module=module)


def run(argv: list[str]) -> int:
    """The command ``argv``, parsed and run; its exit status, returned for ``--help``,
    ``--version`` (0) and a usage error (2) too, for which argparse raises SystemExit
    (:func:`lenvm.cli.main` runs it with SIGTERM raising an interrupt, as Ctrl-C does)."""
    try:
        args = build_parser(argv).parse_args(argv)
    except SystemExit as parsed:  # argparse has printed the help, the version or the usage error
        return int(parsed.code or 0)
    args.argv = argv
    with _quiet_transformers(), _plain_warnings():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    """The chosen command; errors of the user's input, paths and interrupts as messages and exit
    statuses."""
    try:
        options.resolve_model(args)
        status = args.func(args)
    except InputError as err:
        print(f"lenvm: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # stdout closed by its reader (`| head`): nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # a SIGPIPE's: lenvm.cli.main ends the process by it
    except OSError as err:
        if err.errno == errno.ENOSPC:
            print(
                "lenvm: error: no space left on the device; finished files are intact and the "
                "same command resumes once space is freed",
                file=sys.stderr,
            )
            return 28
        if err.filename is None:
            raise
        # A path that cannot be read or written as asked (a folder where a file goes, no
        # permission, a missing parent): the path is the user's to fix.
        print(f"lenvm: error: {err.strerror or err}: {err.filename}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as err:
        if err.name != "vllm":
            raise
        print("lenvm: error: this needs vLLM: install lenvm[vllm] (see the README)", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        resumes = args.command in ("rollout", "train", "demo", "bench") or (
            args.command == "predict" and bool(args.out)
        )
        return interrupted(interrupt, resumes)
    return status or 0
