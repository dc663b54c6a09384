"""RULER-style synthetic long-context QA (arXiv 2404.06654), generated from a seed.

Four tasks: multi-key NIAH, multi-value NIAH, variable tracking and frequent-words
extraction. Each sample is deterministic in (task, seed, words) and scored like RULER's
``string_match_all``: the share of expected strings found in the answer.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass

TASKS = ("multikey", "multivalue", "variable-tracking", "frequent-words")
MIN_WORDS = 100
NOISE = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
         "There and back again.")
KEYS = ("apple", "river", "candle", "pepper", "window", "harbor", "violin", "meadow", "lantern",
        "falcon", "garden", "marble", "thunder", "velvet", "compass", "orchard", "bridge", "saddle",
        "copper", "island", "feather", "canyon", "button", "glacier", "ladder", "mirror", "anchor",
        "blanket", "cactus", "dolphin", "engine", "forest", "helmet", "jacket", "kettle", "lemon",
        "magnet", "needle", "oyster", "pillow", "quartz", "rocket", "spider", "tunnel", "umbrella",
        "wagon", "yogurt", "zipper", "basket", "cherry")
NEEDLES = 4
HOPS = 4
VOCAB = 30
ZIPF_ALPHA = 2.0


@dataclass(frozen=True)
class Sample:
    """A context, the question asked after it, the answer's start, what it must contain."""

    task: str
    context: str
    question: str
    completion: str
    answers: tuple[str, ...]


def make_sample(task: str, seed: int, words: int) -> Sample:
    """A sample of ``task`` whose context is about ``words`` words long."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: choose one of {', '.join(TASKS)}")
    if words < MIN_WORDS:
        raise ValueError(f"{task} needs a context of at least {MIN_WORDS} words, got {words}: "
                         f"ask for {MIN_WORDS} or more")
    rng = random.Random(f"{task}-{seed}-{words}")
    return _BUILDERS[task](rng, words)


def score(answer: str, sample: Sample) -> float:
    """RULER's string_match_all: the share of ``sample.answers`` found in ``answer``
    (case-insensitive)."""
    text = answer.lower()
    return sum(a.lower() in text for a in sample.answers) / len(sample.answers)


def _scatter(rng: random.Random, statements: list[str], words: int) -> str:
    """Noise sentences with ``statements`` at random sentence boundaries (in the given
    order), about ``words`` words in all."""
    needed = words - sum(len(s.split()) for s in statements)
    filler, count = [], 0
    while count < needed:
        sentence = NOISE[len(filler) % len(NOISE)]
        filler.append(sentence)
        count += len(sentence.split())
    slots = sorted(rng.randint(0, len(filler)) for _ in statements)
    for offset, (slot, statement) in enumerate(zip(slots, statements)):
        filler.insert(slot + offset, statement)
    return " ".join(filler)


def _numbers(rng: random.Random, n: int) -> list[str]:
    """``n`` distinct 7-digit numbers."""
    return [str(v) for v in rng.sample(range(1_000_000, 10_000_000), n)]


def _needle(key: str, value: str) -> str:
    return f"One of the special magic numbers for {key} is: {value}."


def _multikey(rng: random.Random, words: int) -> Sample:
    keys, values = rng.sample(KEYS, NEEDLES), _numbers(rng, NEEDLES)
    statements = [_needle(k, v) for k, v in zip(keys, values)]
    rng.shuffle(statements)
    asked = rng.randrange(NEEDLES)
    key = keys[asked]
    return Sample("multikey", _scatter(rng, statements, words),
                  f"What is the special magic number for {key} mentioned in the provided text?",
                  f"The special magic number for {key} mentioned in the provided text is",
                  (values[asked],))


def _multivalue(rng: random.Random, words: int) -> Sample:
    key, values = rng.choice(KEYS), _numbers(rng, NEEDLES)
    return Sample("multivalue", _scatter(rng, [_needle(key, v) for v in values], words),
                  f"What are all the special magic numbers for {key} mentioned in the provided text?",
                  f"The special magic numbers for {key} mentioned in the provided text are",
                  tuple(values))


def _chain(names: list[str], value: str) -> list[str]:
    """``VAR`` statements passing ``value`` down ``names``, one hop each."""
    return [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]


def _interleave(rng: random.Random, a: list[str], b: list[str]) -> list[str]:
    """Merge two lists at random, keeping each one's order."""
    order = [0] * len(a) + [1] * len(b)
    rng.shuffle(order)
    ia, ib = iter(a), iter(b)
    return [next(ia) if which == 0 else next(ib) for which in order]


def _variable_tracking(rng: random.Random, words: int) -> Sample:
    value, other = (str(v) for v in rng.sample(range(10_000, 100_000), 2))
    names: list[str] = []
    while len(names) < 2 * (HOPS + 1):
        name = "".join(rng.choices(string.ascii_uppercase, k=5))
        if name not in names:
            names.append(name)
    chain, distractor = names[: HOPS + 1], names[HOPS + 1:]
    statements = _interleave(rng, _chain(chain, value), _chain(distractor, other))
    return Sample("variable-tracking", _scatter(rng, statements, words),
                  f"Find all variables that are assigned the value {value} in the text above.",
                  f"According to the chain of variable assignments in the text above, {len(chain)} "
                  f"variables are assigned the value {value}, they are:",
                  tuple(chain))


def _frequent_words(rng: random.Random, words: int) -> Sample:
    """Exactly ``words`` words with Zipf-like counts (largest remainder), shuffled."""
    vocab = rng.sample(KEYS, VOCAB)
    weights = [1 / (rank + 1) ** ZIPF_ALPHA for rank in range(VOCAB)]
    shares = [w / sum(weights) * words for w in weights]
    counts = [int(s) for s in shares]
    by_remainder = sorted(range(VOCAB), key=lambda i: counts[i] - shares[i])
    for i in by_remainder[: words - sum(counts)]:
        counts[i] += 1
    stream = [w for w, c in zip(vocab, counts) for _ in range(c)]
    rng.shuffle(stream)
    return Sample("frequent-words", " ".join(stream),
                  "What are the three most frequently appearing words in the above text?",
                  "The three most frequently appearing words in the above text are:",
                  tuple(vocab[:3]))


_BUILDERS = {"multikey": _multikey, "multivalue": _multivalue,
             "variable-tracking": _variable_tracking, "frequent-words": _frequent_words}
