"""A built-in prompt set whose natural answer lengths differ a lot.

Written for this project: one-word answers, lists of N items, one-sentence and long
explanations, short stories and simple arithmetic. Each prompt carries a ``domain`` so that
results can be broken down, and list prompts carry the number of items they ask for.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

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


# -- generated prompts: writing, question answering, reasoning --------------------------------
#
# Templates filled from word lists with a seeded generator, with and without a length
# instruction, so that a LenVM sees how the same kind of request changes length with what it
# asks for. Written for this project (short requests, unlike LIFEBench's long source texts).

_WRITING_TASKS = [
    "Write a poem about {subject}.",
    "Write a thank-you note to {person} for {gift}.",
    "Write an email to {person} about {event}.",
    "Write a product description for {product}.",
    "Write a diary entry about {event}.",
    "Write a short speech for {event}.",
    "Describe {place} to someone who has never been there.",
    "Write a letter to {person} about {subject}.",
    "Write a review of {product}.",
    "Write an advertisement for {product}.",
]
_SUBJECTS = [
    "the first snow of winter",
    "an old bridge",
    "a busy train station",
    "a quiet library",
    "the smell of coffee",
    "a summer thunderstorm",
    "a garden in spring",
    "the night sky",
    "a city at dawn",
    "a forgotten toy",
    "the sound of waves",
    "a long road trip",
]
_PEOPLE = ["a neighbor", "a teacher", "a grandmother", "a coworker", "a friend", "a coach", "a doctor"]
_GIFTS = ["a handmade scarf", "a birthday cake", "a book", "help with moving", "a concert ticket", "a plant"]
_EVENTS = [
    "a team picnic",
    "a school reunion",
    "a charity run",
    "the opening of a bakery",
    "a science fair",
    "a wedding anniversary",
    "a farewell party",
    "a new library",
]
_PRODUCTS = [
    "a reusable water bottle",
    "a folding bicycle",
    "a solar lamp",
    "a pair of hiking boots",
    "a wooden chess set",
    "a noise-cancelling headset",
    "a kitchen timer",
    "a travel backpack",
]
_PLACES = ["a mountain village", "a desert at noon", "a fish market", "a rainforest", "an island harbor"]

_QA_TASKS = [
    "What is {concept}?",
    "How does {concept} work?",
    "Why is {concept} important?",
    "What are the advantages and disadvantages of {concept}?",
    "Who uses {concept}, and for what?",
    "What is the difference between {concept} and {other}?",
]
_CONCEPTS = [
    "a credit score",
    "compound interest",
    "a solar panel",
    "the immune system",
    "a democracy",
    "machine translation",
    "a savings account",
    "a wind turbine",
    "public transport",
    "a library card",
    "a time zone",
    "a passport",
    "composting",
    "a spreadsheet",
    "a password manager",
    "a thermostat",
    "a lighthouse",
    "a satellite",
    "a museum",
    "a weather forecast",
]

_REASONING_TASKS = [
    "A train leaves at {h}:00 and the trip takes {d} hours and {m} minutes. At what time does it "
    "arrive? Explain your reasoning.",
    "Which is larger, {a}/{b} or {c}/{e}? Explain why.",
    "Sort these numbers from smallest to largest and explain how you did it: {numbers}.",
    "{name} is older than {other}, and {other} is older than {third}. Who is the youngest? "
    "Explain your answer.",
    "A shop sells pens at {a} for {b} dollars. How much do {c} pens cost? Show your steps.",
    "If today is {day}, what day of the week will it be in {d} days? Explain.",
    "A rectangle is {a} cm long and {b} cm wide. What are its area and perimeter? Show your work.",
    "Is {a} a prime number? Explain how you know.",
]
_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
_NAMES = ["Ava", "Ben", "Chloe", "Dan", "Eva", "Finn", "Gina", "Hugo", "Iris", "Jack"]

# How a prompt may ask for a length; None asks for nothing. (kind, template, numbers asked for,
# the template for one where the language says it otherwise)
_INSTRUCTIONS = [
    None,
    None,
    ("words", "Respond in about {n} words.", (20, 40, 80, 150), None),
    ("sentences", "Respond in {n} sentences.", (1, 2, 3, 5), "Respond in one sentence."),
    ("bullets", "Respond in {n} bullet points.", (3, 5, 7), None),
    ("brief", "Keep it brief.", (None,), None),
    ("detailed", "Give a detailed answer.", (None,), None),
]

# The same kinds of request in Chinese (written for this project, not translated line by line).
# "words" asks for characters (字), as Chinese length instructions do.
_ZH_WRITING_TASKS = [
    "写一首关于{subject}的诗。",
    "给{person}写一封感谢信，感谢{gift}。",
    "给{person}写一封关于{event}的邮件。",
    "为{product}写一段产品介绍。",
    "写一篇关于{event}的日记。",
    "为{event}写一篇简短的致辞。",
    "向从没去过的人描述{place}。",
    "给{person}写一封关于{subject}的信。",
    "写一篇{product}的使用评价。",
    "为{product}写一则广告。",
]
_ZH_SUBJECTS = [
    "冬天的第一场雪",
    "一座老桥",
    "繁忙的火车站",
    "安静的图书馆",
    "咖啡的香味",
    "夏天的雷雨",
    "春天的花园",
    "夜空",
    "黎明时的城市",
    "一件被遗忘的玩具",
    "海浪的声音",
    "一次长途旅行",
]
_ZH_PEOPLE = ["邻居", "老师", "奶奶", "同事", "朋友", "教练", "医生"]
_ZH_GIFTS = ["亲手织的围巾", "生日蛋糕", "一本书", "帮忙搬家", "一张音乐会门票", "一盆植物"]
_ZH_EVENTS = [
    "团队野餐",
    "同学聚会",
    "慈善跑步",
    "面包店开业",
    "科技展览",
    "结婚纪念日",
    "欢送会",
    "新图书馆落成",
]
_ZH_PRODUCTS = [
    "保温水杯",
    "折叠自行车",
    "太阳能台灯",
    "登山鞋",
    "木制象棋",
    "降噪耳机",
    "厨房定时器",
    "旅行背包",
]
_ZH_PLACES = ["一个山村", "正午的沙漠", "鱼市", "热带雨林", "海岛上的港口"]
_ZH_QA_TASKS = [
    "什么是{concept}？",
    "{concept}是怎样运作的？",
    "{concept}为什么重要？",
    "{concept}有哪些优点和缺点？",
    "谁会用到{concept}，用来做什么？",
    "{concept}和{other}有什么区别？",
]
_ZH_CONCEPTS = [
    "信用评分",
    "复利",
    "太阳能电池板",
    "免疫系统",
    "民主制度",
    "机器翻译",
    "储蓄账户",
    "风力发电机",
    "公共交通",
    "借书证",
    "时区",
    "护照",
    "堆肥",
    "电子表格",
    "密码管理器",
    "恒温器",
    "灯塔",
    "人造卫星",
    "博物馆",
    "天气预报",
]
_ZH_REASONING_TASKS = [
    "一列火车{h}点出发，行程需要{d}小时{m}分钟。它几点到达？请解释你的推理。",
    "{a}/{b}和{c}/{e}哪个更大？请说明理由。",
    "把这些数从小到大排序，并说明你是怎么做的：{numbers}。",
    "{name}比{other}年龄大，{other}比{third}年龄大。谁最小？请解释你的答案。",
    "商店里{a}支笔卖{b}元。{c}支笔要多少钱？请写出步骤。",
    "如果今天是{day}，{d}天后是星期几？请解释。",
    "一个长方形长{a}厘米、宽{b}厘米。它的面积和周长是多少？请写出计算过程。",
    "{a}是质数吗？请说明你是怎么知道的。",
]
_ZH_DAYS = ["星期一", "星期二", "星期三", "星期四", "星期五", "星期六", "星期日"]
_ZH_NAMES = ["小明", "小红", "小华", "小丽", "小强", "小美", "小刚", "小芳", "小军", "小雪"]
_ZH_INSTRUCTIONS = [
    None,
    None,
    ("words", "请用大约{n}字回答。", (40, 80, 150, 300), None),
    ("sentences", "请用{n}句话回答。", (1, 2, 3, 5), "请用一句话回答。"),
    ("bullets", "请分{n}点回答。", (3, 5, 7), None),
    ("brief", "请简要回答。", (None,), None),
    ("detailed", "请详细回答。", (None,), None),
]


@dataclass(frozen=True)
class _Vocabulary:
    """The templates and word lists of one language."""

    writing: list[str]
    subjects: list[str]
    people: list[str]
    gifts: list[str]
    events: list[str]
    products: list[str]
    places: list[str]
    questions: list[str]
    concepts: list[str]
    reasoning: list[str]
    days: list[str]
    names: list[str]
    instructions: Sequence[tuple[str, str, tuple[int | None, ...], str | None] | None]
    separator: str  # between the task and its length instruction


_VOCABULARIES = {
    "en": _Vocabulary(
        writing=_WRITING_TASKS, subjects=_SUBJECTS, people=_PEOPLE, gifts=_GIFTS, events=_EVENTS,
        products=_PRODUCTS, places=_PLACES, questions=_QA_TASKS, concepts=_CONCEPTS,
        reasoning=_REASONING_TASKS, days=_DAYS, names=_NAMES, instructions=_INSTRUCTIONS, separator=" ",
    ),
    "zh": _Vocabulary(
        writing=_ZH_WRITING_TASKS, subjects=_ZH_SUBJECTS, people=_ZH_PEOPLE, gifts=_ZH_GIFTS,
        events=_ZH_EVENTS, products=_ZH_PRODUCTS, places=_ZH_PLACES, questions=_ZH_QA_TASKS,
        concepts=_ZH_CONCEPTS, reasoning=_ZH_REASONING_TASKS, days=_ZH_DAYS, names=_ZH_NAMES,
        instructions=_ZH_INSTRUCTIONS, separator="",
    ),
}  # fmt: skip
GENERATED_DOMAINS = ("writing", "qa", "reasoning")
GENERATED_LANGUAGES = tuple(_VOCABULARIES)


def generated_prompts(
    count: int, seed: int = 0, domains: tuple[str, ...] = GENERATED_DOMAINS, lang: str = "en"
) -> list[Prompt]:
    """``count`` prompts drawn evenly from the generated ``domains`` (writing, question answering,
    reasoning), about five in seven with a length instruction ("in about 40 words", "in one
    sentence", "in 5 bullet points", ...); deterministic in ``seed``, never the same text twice.
    ``lang``: ``en`` or ``zh`` (the same kinds of request in Chinese; ids carry the language).

    Each prompt's ``extra`` holds its ``domain``, ``lang`` and ``instruction`` (``none``, ``words``,
    ``sentences``, ``bullets``, ``brief``, ``detailed``) with the number asked for, if any.
    """
    if not is_int(count) or count < 1:
        raise InputError(f"asked for {count} generated prompts: give a positive number")
    unknown = set(domains) - set(GENERATED_DOMAINS)
    if not domains or unknown:
        raise InputError(f"generated prompt domains are {GENERATED_DOMAINS}, got {tuple(domains)}")
    if lang not in _VOCABULARIES:
        raise InputError(f"generated prompts come in {GENERATED_LANGUAGES}, got {lang!r}")
    words = _VOCABULARIES[lang]
    # English keeps the seed string and ids it always had, so that earlier runs resume.
    tag = "" if lang == "en" else f"-{lang}"
    rng = random.Random(f"lenvm-generated{tag}-{seed}")
    makers = {"writing": _writing, "qa": _question, "reasoning": _reasoning}
    prompts, seen = [], set()
    for i in range(count):
        domain = domains[i % len(domains)]
        for _ in range(1000):  # the templates hold thousands of distinct texts per domain
            task = makers[domain](rng, words)
            text, extra = _with_instruction(rng, task, words)
            if text not in seen:
                break
        else:
            raise InputError(f"cannot draw {count} distinct generated prompts")
        seen.add(text)
        extra = {"domain": domain, **({"lang": lang} if tag else {}), **extra}
        prompts.append(Prompt(id=f"{domain}{tag}-s{seed}-{i}", text=text, extra=extra))
    return prompts


def _with_instruction(rng, task: str, words: _Vocabulary) -> tuple[str, dict]:
    choice = rng.choice(words.instructions)
    if choice is None:
        return task, {"instruction": "none"}
    kind, template, numbers, one = choice
    n = rng.choice(numbers)
    if one is not None and n == 1:
        template = one
    extra = {"instruction": kind} | ({"asked": n} if n is not None else {})
    return f"{task}{words.separator}{template.format(n=n)}", extra


def _writing(rng, words: _Vocabulary) -> str:
    return rng.choice(words.writing).format(
        subject=rng.choice(words.subjects),
        person=rng.choice(words.people),
        gift=rng.choice(words.gifts),
        event=rng.choice(words.events),
        product=rng.choice(words.products),
        place=rng.choice(words.places),
    )


def _question(rng, words: _Vocabulary) -> str:
    concept, other = rng.sample(words.concepts, 2)
    return rng.choice(words.questions).format(concept=concept, other=other)


def _reasoning(rng, words: _Vocabulary) -> str:
    name, other, third = rng.sample(words.names, 3)
    return rng.choice(words.reasoning).format(
        h=rng.randint(1, 11),
        d=rng.randint(2, 30),
        m=rng.choice([10, 15, 20, 30, 45]),
        a=rng.randint(2, 97),
        b=rng.randint(2, 30),
        c=rng.randint(2, 40),
        e=rng.randint(2, 30),
        numbers=", ".join(str(rng.randint(1, 999)) for _ in range(rng.randint(4, 8))),
        name=name,
        other=other,
        third=third,
        day=rng.choice(words.days),
    )
