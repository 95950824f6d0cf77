"""Math tasks for the benchmarks: GSM8K, a seeded arithmetic word-problem generator, and
answer extraction.

Prompts built here carry a ``domain`` field (``math`` for GSM8K, ``word_problem`` for the
generated problems), which the prediction benchmark groups by.
"""

from __future__ import annotations

import math
import os
import random
import re
from dataclasses import dataclass

from lenvm.io import InputError, iter_jsonl
from lenvm.prompts import Prompt

DEFAULT_GSM8K = "../shared/data/gsm8k/test.jsonl"
MATH_INSTRUCTION = '\nThink step by step, then end with "The answer is" followed by the number.'

# A number: digits with optional thousands commas and decimals; a leading minus only when it
# does not follow a word character or another number ("5-3" is not "-3").
_NUMBER = re.compile(r"(?<![\w.,])(-)?\$?\s?(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?(?!\d)")
_BOXED = re.compile(r"\\boxed\s*\{([^{}]*)\}")
_ANSWER_IS = re.compile(r"(?:answer\s*(?:is|:|=)|####)\s*:?\s*([^\n]*)", re.IGNORECASE)


@dataclass
class Problem:
    """A question with a numeric answer."""

    id: str
    question: str
    answer: float
    domain: str
    level: int | None = None

    def prompt(self) -> Prompt:
        extra = {"domain": self.domain, "answer": self.answer}
        if self.level is not None:
            extra["level"] = self.level
        return Prompt(self.id, text=self.question + MATH_INSTRUCTION, extra=extra)


def parse_number(text: str) -> float | None:
    """The first number in ``text`` ("1,234", "-5", "$3.50", "12."), or None."""
    match = _NUMBER.search(text.replace("\u2212", "-"))
    return _to_float(match) if match else None


def _to_float(match: re.Match) -> float:
    sign, whole, frac = match.groups()
    value = float(whole.replace(",", "") + (frac or ""))
    return -value if sign else value


def gold_answer(solution: str) -> float:
    """The number after ``####`` in a GSM8K solution."""
    if "####" not in solution:
        raise InputError("GSM8K answer without a '#### N' line")
    value = parse_number(solution.rsplit("####", 1)[1])
    if value is None:
        raise InputError(f"GSM8K answer line holds no number: {solution.rsplit('####', 1)[1]!r}")
    return value


def extract_answer(completion: str) -> float | None:
    """The model's final number: the last ``\\boxed{}``, else the last "answer is ..." phrase,
    else the last number anywhere in the text."""
    text = completion.replace("\u2212", "-")
    for pattern in (_BOXED, _ANSWER_IS):
        for found in reversed(pattern.findall(text)):
            value = parse_number(found)
            if value is not None:
                return value
    numbers = list(_NUMBER.finditer(text))
    return _to_float(numbers[-1]) if numbers else None


def is_correct(completion: str, answer: float) -> bool:
    predicted = extract_answer(completion)
    return predicted is not None and math.isclose(predicted, answer, rel_tol=1e-6, abs_tol=1e-6)


def read_gsm8k(
    path: str | os.PathLike = DEFAULT_GSM8K, limit: int | None = None, id_prefix: str = "gsm8k"
) -> list[Problem]:
    """GSM8K problems (``question``, ``answer`` ending in ``#### N``); ids are ``id_prefix``-line
    position (give the train file another prefix than the test file: ids must not collide)."""
    problems: list[Problem] = []
    for index, record in enumerate(iter_jsonl(path)):
        if limit is not None and len(problems) >= limit:
            break
        if not isinstance(record.get("question"), str) or not isinstance(record.get("answer"), str):
            raise InputError(f"{path}: record {index + 1} needs 'question' and 'answer' strings")
        try:
            answer = gold_answer(record["answer"])
        except InputError as err:
            raise InputError(f"{path}: record {index + 1}: {err}") from None
        problems.append(Problem(f"{id_prefix}-{index}", record["question"], answer, "math"))
    if not problems:
        raise InputError(f"{path}: no problems")
    return problems


_NAMES = ["Tom", "Anna", "Sam", "Lily", "Ben", "Maya", "Leo", "Zoe", "Omar", "Nina"]
_ITEMS = ["apples", "marbles", "pencils", "stickers", "cookies", "books", "coins", "shells"]


def _level1(rng: random.Random) -> tuple[str, int]:
    name, friend = rng.sample(_NAMES, 2)
    item = rng.choice(_ITEMS)
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    story = rng.choice(
        [
            f"{name} has {a} {item} and {friend} has {b} {item}. How many {item} do they have together?",
            f"There are {a} {item} on the table and {b} {item} in the box. "
            f"How many {item} are there in total?",
            f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?",
        ]
    )
    return story, a + b


def _level2(rng: random.Random) -> tuple[str, int]:
    name, friend = rng.sample(_NAMES, 2)
    item = rng.choice(_ITEMS)
    a, b = rng.randint(5, 30), rng.randint(2, 20)
    c = rng.randint(1, a + b - 1)
    return (
        f"{name} has {a} {item}. {name} buys {b} more and then gives {c} to {friend}. "
        f"How many {item} does {name} have left?",
        a + b - c,
    )


def _level3(rng: random.Random) -> tuple[str, int]:
    name, friend = rng.sample(_NAMES, 2)
    item = rng.choice(_ITEMS)
    boxes, per_box = rng.randint(3, 12), rng.randint(4, 15)
    extra = rng.randint(1, 20)
    given = rng.randint(1, boxes * per_box + extra - 1)
    return (
        f"{name} buys {boxes} boxes of {item} with {per_box} {item} in each box. "
        f"{friend} gives {name} {extra} more {item}. Then {name} gives away {given} {item}. "
        f"How many {item} does {name} have now?",
        boxes * per_box + extra - given,
    )


_LEVELS = {1: _level1, 2: _level2, 3: _level3}


def arithmetic_problems(n: int, level: int = 1, seed: int = 0) -> list[Problem]:
    """``n`` arithmetic word problems; the same ``(level, seed)`` always gives the same list.

    Level 1: one addition of one-digit numbers in a one-sentence story. Level 2: an addition and
    a subtraction. Level 3: a multiplication, an addition and a subtraction.
    """
    if level not in _LEVELS:
        raise InputError(f"arithmetic level must be one of {sorted(_LEVELS)}, got {level}")
    rng = random.Random(f"lenvm-arithmetic-{level}-{seed}")
    problems = []
    for i in range(n):
        question, answer = _LEVELS[level](rng)
        problems.append(
            Problem(f"arith-l{level}-s{seed}-{i}", question, float(answer), "word_problem", level)
        )
    return problems
