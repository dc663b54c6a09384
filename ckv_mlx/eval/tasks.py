"""Evaluation samples: a document, its questions, and how to score each answer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ..errors import CKVError
from .niah import Needle, exact_match, needle_prompt, question_text, rouge1_recall
from ..text.prompts import split_prompt
from . import facts, reading, ruler

WORDS_PER_TOKEN = 0.7
Scorer = Callable[[str], dict]


@dataclass(frozen=True)
class EvalSample:
    """One document (prefilled once) and one or more questions asked in turn."""

    key: str
    task: str
    length: int
    document: list[int]
    questions: list[list[int]]
    scorers: list[Scorer] = field(repr=False)
    depth: int | None = None
    max_tokens: int | None = None  # answer tokens, where the sample sets its own
    info: dict = field(default_factory=dict)  # more fields for its records
    whole_answer: bool = False  # the answer runs to its token limit, not to the end of its first line


def _needle_scorer(needle: Needle) -> Scorer:
    return lambda answer: {"score": float(exact_match(answer, needle)),
                           "rouge1": rouge1_recall(answer, needle.real_needle)}


def niah_samples(tokenizer, haystack: str, needles: list[Needle], lengths, depths, style) -> list[EvalSample]:
    """Every needle at every depth of every length; the question asks for that needle."""
    samples = []
    for length in lengths:
        for depth in depths:
            for i, needle in enumerate(needles):
                p = needle_prompt(tokenizer, haystack, [needle], length, [depth], style)
                samples.append(EvalSample(f"niah/L{length}/D{depth}/N{i}", "niah", length, p.document,
                                          [p.question], [_needle_scorer(needle)], depth))
    return samples


def ruler_samples(tokenizer, tasks, lengths, per_length: int) -> list[EvalSample]:
    """RULER-style synthetic QA at each length, ``per_length`` seeds per task."""
    samples = []
    for task in tasks:
        for length in lengths:
            for seed in range(per_length):
                try:
                    s = ruler.make_sample(task, seed, int(length * WORDS_PER_TOKEN))
                except ValueError as exc:
                    raise CKVError(f"--lengths {length}: {exc}") from None
                question = f"\nQuestion: {s.question}\nAnswer: {s.completion}"
                document, q = split_prompt(tokenizer, s.context, question, True)
                scorer = lambda answer, s=s: {"score": ruler.score(answer, s), "rouge1": None}
                samples.append(EvalSample(f"{task}/L{length}/S{seed}", task, length, document, [q], [scorer]))
    return samples


def followup_samples(tokenizer, haystack: str, needles: list[Needle], count: int, lengths, depths) -> list[EvalSample]:
    """Two needles per document (at ``depth`` and 100 - ``depth``): the first question asks
    for needle ``i`` (``i < count``), the follow-up for the next one (completion style)."""
    if len(needles) < 2:
        raise CKVError("follow-up questions need at least two needles in the needles file")
    samples = []
    for length in lengths:
        for depth in depths:
            for i, first in enumerate(needles[:count]):
                second = needles[(i + 1) % len(needles)]
                p = needle_prompt(tokenizer, haystack, [first, second], length, [depth, 100 - depth])
                follow = tokenizer.encode(question_text(second, "completion"), add_special_tokens=False)
                samples.append(EvalSample(
                    f"followup/L{length}/D{depth}/N{i}", "followup", length, p.document,
                    [p.question, follow], [_needle_scorer(first), _needle_scorer(second)], depth))
    return samples


def fact_samples(tokenizer, kinds, forms, split: str, lengths, per_cell: int, essays=None,
                 style: str = "completion") -> list[EvalSample]:
    """``per_cell`` exact-fact samples of every kind and form at each length, from ``split``."""
    samples = []
    for length in lengths:
        for kind in kinds:
            for form in forms:
                for index in range(per_cell):
                    fact, haystack = facts.make_fact(kind, form, split, index, essays)
                    prompt, answer_tokens = facts.fact_prompt(tokenizer, fact, haystack, length, style)
                    scorer = lambda answer, value=fact.value: facts.score(answer, value)
                    key = f"facts/{split}/{kind}/{form}/L{length}/S{index}" + ("/chat" if style == "chat" else "")
                    samples.append(EvalSample(
                        key, "facts", length, prompt.document, [prompt.question], [scorer], fact.depth, answer_tokens,
                        {"kind": kind, "form": form, "split": split, "document": fact.document, "value": fact.value}))
    return samples


def reading_samples(tokenizer, tasks, kinds, lengths) -> list[EvalSample]:
    """A summary and a list of every thing of a kind (:mod:`reading`), over each kind's
    real documents at each length: scored by fidelity only."""
    samples = []
    for task in tasks:
        for kind in kinds:
            for length in lengths:
                text = reading.document_text(kind, length, tokenizer)
                document, question = split_prompt(tokenizer, text, reading.prompt(task, kind), True)
                samples.append(EvalSample(f"{task}/{kind}/L{length}", task, length, document, [question],
                                          [lambda answer: {"score": None, "rouge1": None}],
                                          max_tokens=reading.ANSWER_TOKENS, info={"kind": kind}, whole_answer=True))
    return samples
