"""A built-in prompt set whose natural answer lengths differ a lot.

Written for this project: one-word answers, lists of N items, one-sentence and long
explanations, short stories and simple arithmetic. Each prompt carries a ``domain`` so that
results can be broken down, and list prompts carry the number of items they ask for.
"""

from __future__ import annotations

import random

from lenvm.io import InputError, is_int
from lenvm.prompts import Prompt

_ONE_WORD = [
    "What is the capital of France?",
    "What color is a ripe banana?",
    "Which planet is closest to the Sun?",
    "What is the opposite of hot?",
    "What animal says 'moo'?",
    "What is frozen water called?",
    "Which season comes after winter?",
    "What is the largest ocean on Earth?",
    "What do bees make?",
    "How many legs does a spider have?",
    "What is the color of grass?",
    "Which organ pumps blood through the body?",
    "What gas do plants take in?",
    "What is the first letter of the English alphabet?",
    "What is the capital of Japan?",
    "Which metal is liquid at room temperature?",
    "What is a baby cat called?",
    "What do you call a shape with three sides?",
    "Which direction does the sun rise from?",
    "What is the main language spoken in Brazil?",
    "What is the tallest animal in the world?",
    "What do caterpillars turn into?",
    "Which instrument has black and white keys?",
    "What is the boiling point of water in Celsius?",
    "Which star is at the center of our solar system?",
    "What is the capital of Italy?",
    "What do cows drink?",
    "Which animal is known as the king of the jungle?",
    "What is the plural of 'mouse'?",
    "Which month has the fewest days?",
    "What is the capital of Spain?",
    "What do you call a baby dog?",
    "Which planet is known as the red planet?",
    "What is the hardest natural substance?",
    "What color do you get by mixing blue and yellow?",
    "What is the largest mammal?",
    "Which bird is a symbol of peace?",
    "What is the chemical symbol for gold?",
    "How many days are in a week?",
    "What is the opposite of up?",
    "Which fruit keeps the doctor away?",
    "What do spiders spin?",
]
_LIST_THINGS = [
    "fruits",
    "animals that live in the ocean",
    "countries in Europe",
    "colors",
    "musical instruments",
    "vegetables",
    "sports",
    "things you find in a kitchen",
    "birds",
    "programming languages",
    "breakfast foods",
    "jobs",
    "tools",
    "flowers",
    "board games",
    "weather words",
]
_TOPICS = [
    "why the sky is blue",
    "how rain forms",
    "what photosynthesis is",
    "how a bicycle works",
    "why we need sleep",
    "how vaccines work",
    "what gravity is",
    "how the internet works",
    "why leaves change color in autumn",
    "how a rainbow forms",
    "what inflation is",
    "how airplanes fly",
    "why the ocean is salty",
    "how the heart works",
    "what electricity is",
    "how computers store information",
    "why exercise is healthy",
    "how bread rises",
    "why the moon has phases",
    "how a refrigerator keeps food cold",
    "what a volcano is",
    "how fish breathe underwater",
    "why we have seasons",
    "how a compass works",
    "what DNA is",
    "how a camera takes a picture",
    "why ice floats on water",
    "how bees make honey",
    "what a black hole is",
    "how a battery stores energy",
    "why the sea has tides",
    "how soap cleans dirt",
    "what an earthquake is",
    "how plants grow from seeds",
    "why we dream",
    "how a microwave heats food",
    "what recycling is",
    "how sound travels",
    "why stars twinkle",
    "how a thermometer works",
]
_STORY_SUBJECTS = [
    "a lost robot",
    "a brave mouse",
    "a talking tree",
    "a dragon who is afraid of fire",
    "two friends on a boat",
    "a cat who becomes a chef",
    "a rainy day in the city",
    "a girl who finds a secret door",
    "an old lighthouse keeper",
    "a penguin who wants to fly",
    "a boy and his kite",
    "a clock that runs backwards",
    "a fox who learns to share",
    "a lonely cloud",
    "a robot who learns to paint",
]


MAX_PROMPTS = 240  # six domains, the smallest with 40 distinct texts


def builtin_prompts(count: int = 96, seed: int = 0) -> list[Prompt]:
    """``count`` prompts drawn evenly from the domains, shuffled with ``seed``; never the same text
    twice, so that no held-out prompt is trained on (up to ``MAX_PROMPTS``)."""
    if not is_int(count) or not 1 <= count <= MAX_PROMPTS:
        raise InputError(
            f"the built-in prompt set has 1 to {MAX_PROMPTS} distinct prompts, asked for {count}"
        )
    rng = random.Random(seed)
    makers = [_one_word, _list, _one_sentence, _detailed, _story, _arithmetic]
    prompts, seen = [], set()
    for i in range(count):
        domain, text, extra = makers[i % len(makers)](rng)
        while text in seen:  # every domain has at least MAX_PROMPTS / 6 distinct texts
            domain, text, extra = makers[i % len(makers)](rng)
        seen.add(text)
        prompts.append(Prompt(id=f"{domain}-{i}", text=text, extra={"domain": domain, **extra}))
    rng.shuffle(prompts)
    return prompts


def _one_word(rng):
    return "one_word", f"{rng.choice(_ONE_WORD)} Answer with a single word.", {}


def _list(rng):
    n = rng.randint(2, 12)
    things = rng.choice(_LIST_THINGS)
    return "list", f"List {n} {things}, one per line, with no other text.", {"items": n}


def _one_sentence(rng):
    return "short_explanation", f"In one short sentence, explain {rng.choice(_TOPICS)}.", {}


def _detailed(rng):
    return "long_explanation", f"Explain {rng.choice(_TOPICS)} in detail, step by step.", {}


def _story(rng):
    lines = rng.choice([2, 4, 8])
    return (
        "story",
        f"Write a story of about {lines} sentences about {rng.choice(_STORY_SUBJECTS)}.",
        {"sentences": lines},
    )


def _arithmetic(rng):
    a, b = rng.randint(2, 60), rng.randint(2, 40)
    op = rng.choice(["+", "-", "*"])
    return "arithmetic", f"What is {a} {op} {b}? Reply with just the number.", {}
