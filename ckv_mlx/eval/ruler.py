"""RULER-style synthetic long-context QA (arXiv 2404.06654), generated from a seed.

Four tasks: multi-key NIAH, multi-value NIAH, variable tracking and frequent-words
extraction. Each sample is deterministic in (task, seed, words) and scored like RULER's
``string_match_all``: the share of expected strings found in the answer.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

TASKS = ("multikey", "multivalue", "variable-tracking", "frequent-words")
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
KEYS = ("apple", "river", "candle", "pepper", "window", "harbor", "violin", "meadow", "lantern",
        "falcon", "garden", "marble", "thunder", "velvet", "compass", "orchard", "bridge", "saddle",
        "copper", "island", "feather", "canyon", "button", "glacier", "ladder", "mirror", "anchor",
        "blanket", "cactus", "dolphin", "engine", "forest", "helmet", "jacket", "kettle", "lemon",
        "magnet", "needle", "oyster", "pillow", "quartz", "rocket", "spider", "tunnel", "umbrella",
        "wagon", "yogurt", "zipper", "basket", "cherry")
MIN_WORDS = {"multikey": 60, "multivalue": 60, "variable-tracking": 60, "frequent-words": 60}
NEEDLES = 4
HOPS = 4


@dataclass(frozen=True)
class Sample:
    """A context, the question asked after it, the answer's start, what it must contain."""

    task: str
    context: str
    question: str
    completion: str
    answers: tuple[str, ...]


def make_sample(task: str, seed: int, words: int) -> Sample:
    """A sample of about ``words`` context words."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: choose one of {', '.join(TASKS)}")
    if words < MIN_WORDS[task]:
        raise ValueError(f"{task} needs at least {MIN_WORDS[task]} words of context, got {words}")
    rng = random.Random(f"{task}-{seed}-{words}")
    return _BUILDERS[task](rng, words)


def score(answer: str, sample: Sample) -> float:
    """RULER's string_match_all: the share of ``sample.answers`` found in ``answer``."""
    text = answer.lower()
    return sum(a.lower() in text for a in sample.answers) / len(sample.answers)


def _number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _scatter(rng: random.Random, statements: list[str], words: int) -> str:
    """Noise sentences of about ``words`` words with ``statements`` at random sentence
    boundaries, in the given order."""
    sentences = NOISE.split(". ")
    sentences = [s if s.endswith(".") else s + "." for s in sentences]
    filler_words = words - sum(len(s.split()) for s in statements)
    filler: list[str] = []
    while sum(len(s.split()) for s in filler) < filler_words:
        filler.append(sentences[len(filler) % len(sentences)])
    slots = sorted(rng.sample(range(len(filler) + 1), len(statements)))
    for offset, (slot, statement) in enumerate(zip(slots, statements)):
        filler.insert(slot + offset, statement)
    return " ".join(filler)


def _multikey(rng, words):
    keys = rng.sample(KEYS, NEEDLES)
    values = [_number(rng) for _ in keys]
    statements = [f"One of the special magic numbers for {k} is: {v}." for k, v in zip(keys, values)]
    rng.shuffle(statements)
    asked = rng.randrange(NEEDLES)
    key = keys[asked]
    return Sample("multikey", _scatter(rng, statements, words),
                  f"What is the special magic number for {key} mentioned in the provided text?",
                  f"The special magic number for {key} mentioned in the provided text is",
                  (values[asked],))


def _multivalue(rng, words):
    key = rng.choice(KEYS)
    values = [_number(rng) for _ in range(NEEDLES)]
    statements = [f"One of the special magic numbers for {key} is: {v}." for v in values]
    return Sample("multivalue", _scatter(rng, statements, words),
                  f"What are all the special magic numbers for {key} mentioned in the provided text?",
                  f"The special magic numbers for {key} mentioned in the provided text are",
                  tuple(values))


def _name(rng, taken: set[str]) -> str:
    while True:
        name = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if name not in taken:
            taken.add(name)
            return name


def _chain(rng, value: str, taken: set[str]) -> tuple[list[str], list[str]]:
    names = [_name(rng, taken) for _ in range(HOPS + 1)]
    statements = [f"VAR {names[0]} = {value}."]
    statements += [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
    return names, statements


def _variable_tracking(rng, words):
    value, other = str(rng.randint(10000, 99999)), str(rng.randint(10000, 99999))
    while other == value:
        other = str(rng.randint(10000, 99999))
    taken: set[str] = set()
    names, chain = _chain(rng, value, taken)
    _, distractor = _chain(rng, other, taken)
    statements = _interleave(rng, chain, distractor)
    return Sample("variable-tracking", _scatter(rng, statements, words),
                  f"Find all variables that are assigned the value {value} in the text above.",
                  f"The variables assigned the value {value} are:",
                  tuple(names))


def _interleave(rng, a: list[str], b: list[str]) -> list[str]:
    """Merge two lists at random, keeping each one's order."""
    order = [0] * len(a) + [1] * len(b)
    rng.shuffle(order)
    ia, ib = iter(a), iter(b)
    return [next(ia) if which == 0 else next(ib) for which in order]


def _frequent_words(rng, words):
    vocab = rng.sample(KEYS, 30)
    weights = [1.0 / (rank + 1) for rank in range(len(vocab))]
    counts = [max(1, round(w / sum(weights) * words)) for w in weights]
    counts[1] = min(counts[1], counts[0] - 2)
    counts[2] = min(counts[2], counts[1] - 2)
    counts[3:] = [min(c, counts[2] - 2) for c in counts[3:]]
    stream = [w for w, c in zip(vocab, counts) for _ in range(max(c, 1))]
    rng.shuffle(stream)
    return Sample("frequent-words", " ".join(stream),
                  "What are the three most frequently appearing words in the above text?",
                  "The three most frequently appearing words in the above text are:",
                  tuple(vocab[:3]))


_BUILDERS = {"multikey": _multikey, "multivalue": _multivalue,
             "variable-tracking": _variable_tracking, "frequent-words": _frequent_words}
