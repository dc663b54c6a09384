"""Exact facts: RULER's needle forms in haystacks of several kinds, split for choosing.

A needle ``One of the special magic {noun} for {key} is: {value}.`` (RULER, arXiv
2404.06654) carries a number of 5 or 7 digits, a UUID, a person's name or a code, in one
of these haystacks:

* ``essays``: Paul Graham's essays (a folder given by the caller, e.g. the paper's);
* ``noise``: RULER's five repeated sentences;
* ``distractors``: nothing but needles of the same form for other keys;
* ``manual``, ``code``, ``legal``, ``financial``: real documents (``data/documents/``).

Every choice is made on the ``dev`` split and reported on ``held-out``: they share no
document (real kinds, essays) and no seed (every kind). An answer scores when it holds
the whole value, not as part of a longer word or number.
"""

from __future__ import annotations

import random
import re
import uuid
from dataclasses import dataclass
from pathlib import Path

from ..errors import CKVError
from .niah import Needle, needle_prompt, rouge1_recall
from .ruler import KEYS, NOISE

DOCUMENTS = Path(__file__).resolve().parents[1] / "data" / "documents"
REAL_KINDS = ("manual", "code", "legal", "financial")
KINDS = ("essays", "noise", "distractors", *REAL_KINDS)
FORMS = ("number5", "number7", "uuid", "name", "code")
SPLITS = ("dev", "held-out")
DEPTHS = tuple(range(0, 101, 10))
ADJECTIVES = ("amber", "brisk", "calm", "dusty", "eager", "faint", "gentle", "hollow", "idle", "jolly", "keen",
              "lucky", "mellow", "nimble", "odd", "proud", "quiet", "rapid", "silent", "tidy")
FIRST_NAMES = ("Helena", "Tobias", "Marguerite", "Desmond", "Priya", "Anselm", "Rosalind", "Kenji", "Ottilie",
               "Bartholomew", "Ingrid", "Caspian", "Leonora", "Emeric", "Sunniva", "Florian")
LAST_NAMES = ("Marsh", "Okonkwo", "Vantongeren", "Castellanos", "Whitcombe", "Lindqvist", "Abernethy",
              "Szymanski", "Fairweather", "Delacroix", "Haldane", "Mbeki", "Rautenbach", "Quennell")
NOUNS = {"number5": "number", "number7": "number", "uuid": "UUID", "name": "name", "code": "code"}
ANSWER_SLACK = 4  # answer tokens beyond the value's own
ESSAYS_NEEDED = ("the essays kind needs --essays DIR, a folder of essays as .txt files (e.g. the paper's Paul Graham "
                 "essays): pass it or leave essays out of --kinds")


@dataclass(frozen=True)
class Fact:
    """One needle of ``form`` for ``key``; ``document`` names its haystack."""

    kind: str
    form: str
    key: str
    value: str
    depth: int
    document: str

    @property
    def needle(self) -> Needle:
        noun = NOUNS[self.form]
        return Needle(needle=_sentence(noun, self.key, self.value),
                      question=f"What is the special magic {noun} for {self.key} mentioned in the provided text?",
                      real_needle=self.value, key=self.value,
                      completion=f"The special magic {noun} for {self.key} mentioned in the provided text is")


def _sentence(noun: str, key: str, value: str) -> str:
    return f"One of the special magic {noun}s for {key} is: {value}."


def value_of(form: str, rng: random.Random) -> str:
    """A random value of ``form``."""
    if form == "number5":
        return str(rng.randrange(10_000, 100_000))
    if form == "number7":
        return str(rng.randrange(1_000_000, 10_000_000))
    if form == "uuid":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    if form == "name":
        return f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"
    if form == "code":
        letters = "ABCDEFGHJKLMNPQRSTUVWXYZ"
        return f"{rng.choice(letters)}{rng.choice(letters)}-{rng.randrange(1000, 10000)}-{rng.choice(letters)}{rng.choice(letters)}"
    raise CKVError(f"unknown fact form {form!r}: choose from {', '.join(FORMS)}")


def exact(answer: str, value: str) -> bool:
    """Whether ``answer`` holds the whole ``value`` (case-insensitive), not inside a longer
    run of letters or digits."""
    pattern = rf"(?<![0-9A-Za-z]){re.escape(value)}(?![0-9A-Za-z])"
    return re.search(pattern, answer, re.IGNORECASE) is not None


def score(answer: str, value: str) -> dict:
    """The record's scores: whole value (``score``), substring as NIAH scores, ROUGE-1."""
    return {"score": float(exact(answer, value)), "substring": float(value.lower() in answer.lower()),
            "rouge1": rouge1_recall(answer, value)}


def documents(kind: str, split: str, essays: Path | None = None) -> list[Path]:
    """The documents of ``kind`` in ``split``: alternate files in name order (the first,
    third, ... develop; the second, fourth, ... are held out). Synthetic kinds have none."""
    if kind in ("noise", "distractors"):
        return []
    folder = essays if kind == "essays" else DOCUMENTS / kind
    if folder is None:
        raise CKVError(ESSAYS_NEEDED)
    files = sorted(Path(folder).glob("*.txt"))
    if len(files) < 2:
        raise CKVError(f"{folder}: the {kind} kind needs at least two .txt documents to split into dev and held-out")
    return files[SPLITS.index(split)::2]


def seed_of(split: str, kind: str, form: str, index: int) -> str:
    return f"facts/{split}/{kind}/{form}/{index}"


def make_fact(kind: str, form: str, split: str, index: int, essays: Path | None = None) -> tuple[Fact, str]:
    """The ``index``-th fact of (``kind``, ``form``) in ``split`` and its haystack text."""
    if kind not in KINDS:
        raise CKVError(f"unknown haystack kind {kind!r}: choose from {', '.join(KINDS)}")
    if split not in SPLITS:
        raise CKVError(f"unknown split {split!r}: choose from {', '.join(SPLITS)}")
    rng = random.Random(seed_of(split, kind, form, index))
    key = f"{rng.choice(ADJECTIVES)}-{rng.choice(KEYS)}"
    value, depth = value_of(form, rng), rng.choice(DEPTHS)
    if kind == "noise":
        return Fact(kind, form, key, value, depth, "noise"), " ".join(NOISE * 40)
    if kind == "distractors":
        return Fact(kind, form, key, value, depth, "distractors"), _distractors(rng, form, key, value)
    files = documents(kind, split, essays)
    if kind == "essays":
        rng.shuffle(files)
        text = "\n\n".join(f.read_text(encoding="utf-8", errors="replace").strip() for f in files[:4])
        return Fact(kind, form, key, value, depth, "+".join(f.stem for f in files[:4])), text
    chosen = files[(index + FORMS.index(form)) % len(files)]  # every document, even at one sample a form
    return Fact(kind, form, key, value, depth, chosen.stem), chosen.read_text(encoding="utf-8")


def _distractors(rng: random.Random, form: str, asked: str, value: str, count: int = 400) -> str:
    """``count`` needles of ``form`` for keys other than ``asked``, one a line, none with
    the asked ``value`` (a copied wrong line must not score)."""
    keys = [f"{a}-{k}" for a in ADJECTIVES for k in KEYS if f"{a}-{k}" != asked]
    lines = []
    for key in rng.sample(keys, count):
        other = value_of(form, rng)
        while other == value:
            other = value_of(form, rng)
        lines.append(_sentence(NOUNS[form], key, other))
    return "\n".join(lines)


def fact_prompt(tokenizer, fact: Fact, haystack: str, length: int, style: str = "completion"):
    """The needle prompt of ``fact`` at about ``length`` tokens, its needle at a sentence
    start (a line start in code and among distractors); plus the answer tokens it needs
    (in chat style, room to restate the question first)."""
    boundary = "line" if fact.kind in ("code", "distractors") else "sentence"
    prompt = needle_prompt(tokenizer, haystack, [fact.needle], length, [fact.depth], style, boundary)
    value = len(tokenizer.encode(" " + fact.value, add_special_tokens=False))
    restated = len(tokenizer.encode(fact.needle.completion, add_special_tokens=False)) if style == "chat" else 0
    return prompt, value + restated + ANSWER_SLACK
