"""Flags that several commands share, declared once with one set of defaults.

The sampling flags default to None, so that a command can tell a flag the user gave from one
left out: left out, a flag takes the policy a LenVM was trained on where a LenVM is involved
(its values describe that policy only), else :class:`~lenvm.decoding.SamplingParams`' default.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from typing import Any

from lenvm.decoding.params import DEFAULT_MAX_NEW_TOKENS, POLICY_SETTINGS, SamplingParams
from lenvm.hub import DEFAULT_MODEL, DTYPES

_DEFAULTS = SamplingParams()


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Help that ends each option's line with its default, where the option takes a value, has a
    default worth showing (not None, False or an empty list) and its help does not speak of one
    already. A list shows as it is typed: ``--betas 0 2 5``."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text, default = action.help or "", action.default
        if (
            not action.option_strings
            or action.nargs == 0  # a switch: its name says what it does
            or any(default is nothing for nothing in (None, False, argparse.SUPPRESS))  # 0 is one
            or default == []
            or "default" in text
        ):
            return action.help
        shown = " ".join(map(str, default)).replace("%", "%%") if isinstance(default, list) else "%(default)s"
        return f"{text} (default: {shown})".lstrip()


class Parser(argparse.ArgumentParser):
    """An argument parser whose help shows defaults (:class:`DefaultsHelpFormatter`), as do the
    parsers of its subcommands, which are made of the same class."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)
        # A value like -1e-3 is a number, not an unknown option, as Python 3.13's argparse has it:
        # before, `--tilt -1e-3` failed with "expected one argument". No option of ours starts
        # with a digit.
        self._negative_number_matcher = re.compile(r"-\.?\d")


def path(text: str) -> str:
    """An argparse type for a file or folder: a leading ``~`` is the home folder, as a shell
    expands it everywhere except after ``--flag=``. Anything else (a hub id, ``-``, a URL) is left
    as it is."""
    return os.path.expanduser(text)


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    return _number(text, int, 1)


def non_negative_int(text: str) -> int:
    """An argparse type: an integer of at least 0."""
    return _number(text, int, 0)


def non_negative_float(text: str) -> float:
    """An argparse type: a number of at least 0."""
    return _number(text, float, 0)


def positive_float(text: str) -> float:
    """An argparse type: a number above 0."""
    value = _number(text, float, 0)
    if value == 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return value


def port(text: str) -> int:
    """An argparse type: a TCP port number."""
    return _number(text, int, 0, 65535)


def json_object(text: str) -> dict[str, Any]:
    """An argparse type: a JSON object, such as keyword arguments by name."""
    try:
        value = json.loads(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"not JSON ({err}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(
            f"expected a JSON object of names and values, like '{{\"name\": 1}}', got {text!r}"
        )
    return value


def _number(text: str, kind: type, low: float, high: float | None = None):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected {'an integer' if kind is int else 'a number'}, got {text!r}"
        ) from None
    if not (value >= low and (high is None or value <= high)):  # NaN fails too
        raise argparse.ArgumentTypeError(
            f"must be {f'from {low} to {high}' if high is not None else f'at least {low}'}, got {text}"
        )
    return value


def add_model(
    parser: argparse.ArgumentParser,
    flag: str = "--model",
    help: str | None = None,
    default: str | None = DEFAULT_MODEL,
) -> None:
    """The generator to load, and where and how to load every model of the command."""
    parser.add_argument(
        flag, type=path, default=default, help=help or "generator: folder, hub id or built-in alias"
    )
    add_device(parser)


def add_generator(parser: argparse.ArgumentParser) -> None:
    """``--model`` for a command that may also load a LenVM: left out, the generator that LenVM
    was made for (see :func:`resolve_model`)."""
    add_model(
        parser,
        help=f"generator: folder, hub id or built-in alias (default: the LenVM's, else {DEFAULT_MODEL})",
        default=None,
    )
    parser.set_defaults(model_follows_lenvm=True)


def add_lenvm_generator(parser: argparse.ArgumentParser) -> None:
    """``--model`` for a command that reads a LenVM: the generator its head reads, where the one the
    LenVM names has moved (checked against the LenVM's tokenizer)."""
    parser.add_argument(
        "--model",
        type=path,
        dest="lenvm_generator",
        help="the generator the LenVM reads (default: the one it names; checked against its tokenizer)",
    )


def resolve_model(args: argparse.Namespace) -> None:
    """Fill in a ``--model`` left out (:func:`add_generator`): the generator of the command's
    LenVM, whose head reads that generator's states, else the built-in default."""
    if not getattr(args, "model_follows_lenvm", False) or args.model is not None:
        return
    from lenvm.model import generator_for

    args.model = generator_for(None, getattr(args, "lenvm", None) or getattr(args, "exact", None))


def add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device", help="torch device for the models (default: the first accelerator, else cpu)"
    )
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help="weights' dtype")


def add_sampling(
    parser: argparse.ArgumentParser,
    seed_help: str,
    max_new_tokens: int | None = None,
    fits_context: bool = False,
) -> None:
    """The decoding policy: temperature, truncation, length (default ``max_new_tokens``, else
    SamplingParams'; with ``fits_context`` left None, for the command to cap to the context its
    prompt leaves) and seed."""
    group = parser.add_argument_group("sampling")
    group.add_argument("--temperature", type=float, help=f"0 is greedy (default {_DEFAULTS.temperature:g}*)")
    group.add_argument("--top-p", type=float, help=f"nucleus mass, 1 is off (default {_DEFAULTS.top_p:g}*)")
    group.add_argument("--top-k", type=int, help=f"0 is off (default {_DEFAULTS.top_k}*)")
    group.add_argument("--min-p", type=float, help=f"0 is off (default {_DEFAULTS.min_p:g}*)")
    default = None if fits_context else max_new_tokens or DEFAULT_MAX_NEW_TOKENS
    shown = (
        f"{DEFAULT_MAX_NEW_TOKENS}, or what the context leaves after the prompt"
        if fits_context
        else "%(default)s"
    )
    group.add_argument(
        "--max-new-tokens",
        type=int,
        default=default,
        help=f"most tokens an answer may take (default {shown})",
    )
    group.add_argument("--seed", type=int, help=seed_help)
    group.description = "* left out: the LenVM's training policy where a LenVM is used, else this default"


def sampling_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling flags the user gave (temperature, top_p, top_k, min_p), by name."""
    return {name: getattr(args, name) for name in POLICY_SETTINGS if getattr(args, name, None) is not None}


def sampling_from_args(args: argparse.Namespace, policy: dict[str, Any] | None = None) -> SamplingParams:
    """The :class:`SamplingParams` of the flags; flags left out take ``policy`` (a LenVM's training
    policy), then the defaults (``--max-new-tokens`` left out: fitted to the context by the engine)."""
    return SamplingParams.from_policy(
        policy, **sampling_overrides(args), max_new_tokens=args.max_new_tokens, seed=args.seed
    )


def add_decoding(parser: argparse.ArgumentParser, batch_size: int) -> None:
    """How guided decoding runs: candidates per step and rows per batch."""
    parser.add_argument(
        "--num-candidates", type=int, default=8, help="candidates a control weighs per step (at least 2)"
    )
    parser.add_argument(
        "--batch-size", type=positive_int, default=batch_size, help="requests decoded at once"
    )


def add_backend(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backend",
        choices=["engine", "vllm"],
        default="engine",
        help="what generates: our engine, or vLLM with the LenVM's logits processor (one pass: no "
        "retries or best_of; needs the [vllm] extra)",
    )


def add_prompt_extras(parser: argparse.ArgumentParser) -> None:
    """``--image`` and ``--chat-template-kwargs``: what goes with ``--prompt`` besides its text (a
    prompts file's records give both themselves)."""
    parser.add_argument(
        "--image",
        type=path,
        action="append",
        metavar="PATH",
        help="an image for --prompt (a path, file:// or data: URL; repeat for several); needs a "
        "vision-language generator",
    )
    parser.add_argument(
        "--chat-template-kwargs",
        type=json_object,
        metavar="JSON",
        help="variables for --prompt's chat template, a JSON object (e.g. '{\"enable_thinking\": false}')",
    )
