"""Needle-in-a-haystack prompts: the data behind SRH profiling and the NIAH evaluation.

A needle sentence is inserted into haystack text at a depth (moved back to a sentence
end, method doc section 1), and a question about it follows, completion-style or
chat-style. The package ships its own needles and haystack (``ckv_mlx/data``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from rouge_score import rouge_scorer

from ..errors import CKVError, read_jsonl
from ..text.prompts import render, split_prompt

DATA = Path(__file__).resolve().parents[1] / "data"  # ckv_mlx/data
DEFAULT_NEEDLES = DATA / "needles.jsonl"
DEFAULT_HAYSTACK = DATA / "haystack"
STYLES = ("completion", "chat")
BOUNDARIES = ("period", "sentence", "line")
SPAN_COVERAGE = 0.9


@dataclass(frozen=True)
class Needle:
    """A fact to hide, the question that asks for it and the answer span.

    ``key`` is what an exact-match answer must contain (default: the whole span);
    ``completion`` starts the answer in completion-style prompts.
    """

    needle: str
    question: str
    real_needle: str
    key: str = ""
    completion: str = ""

    @property
    def match(self) -> str:
        return self.key or self.real_needle


def load_needles(path: str | Path = DEFAULT_NEEDLES) -> list[Needle]:
    """Needles from a JSONL file (the reference's ``needles.jsonl`` reads as it is)."""
    needles = []
    for number, fields in read_jsonl(path, "needles"):
        try:
            needles.append(Needle(**{k: str(v) for k, v in fields.items()}))
        except (TypeError, AttributeError) as exc:
            raise CKVError(
                f"{path}, line {number}: not a needle ({exc}); each line needs "
                '"needle", "question" and "real_needle"'
            ) from None
    return needles


def load_haystack(path: str | Path = DEFAULT_HAYSTACK) -> str:
    """Haystack text: one file, or every ``*.txt`` of a folder in name order."""
    path = Path(path)
    files = sorted(path.glob("*.txt")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise CKVError(f"{path}: no haystack text here; pass a .txt file or a folder of them")
    text = "\n\n".join(f.read_text(encoding="utf-8", errors="replace").strip() for f in files)
    if not text.strip():
        raise CKVError(f"{path}: the haystack is empty")
    return text


@lru_cache(maxsize=4)
def _encoded(tokenizer, text: str) -> tuple[int, ...]:
    """Tokens of ``text``, quiet about texts longer than the model's context."""
    logger = logging.getLogger("transformers.tokenization_utils_base")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        return tuple(tokenizer.encode(text, add_special_tokens=False))
    finally:
        logger.setLevel(level)


@dataclass(frozen=True)
class NeedlePrompt:
    """One needle test: the prompt split into document and question tokens."""

    document: list[int]
    question: list[int]
    needle: Needle
    depth: int

    @property
    def tokens(self) -> list[int]:
        return self.document + self.question


def question_text(needle: Needle, style: str) -> str:
    """What follows the haystack: the question, and for completion style the answer's start."""
    if style == "completion":
        answer = f"Answer: {needle.completion}".rstrip()
        return f"\nBased on the content of the text, Question: {needle.question}\n{answer}"
    if style == "chat":
        return f"Based on the content of the text, answer the question: {needle.question}"
    raise CKVError(f"unknown prompt style {style!r}: use one of {', '.join(STYLES)}")


def needle_prompt(
    tokenizer, haystack: str, needles: list[Needle], length: int, depths: list[int], style: str = "completion",
    boundary: str = "period",
) -> NeedlePrompt:
    """A prompt of about ``length`` tokens with ``needles[i]`` at ``depths[i]`` percent,
    moved back to just after a ``boundary`` (see :func:`_starts_here`); the question
    asks for the first needle. A needle at a line start ends its own line."""
    question = question_text(needles[0], style)
    if boundary not in BOUNDARIES:
        raise CKVError(f"unknown needle boundary {boundary!r}: use one of {', '.join(BOUNDARIES)}")
    inserts = [_encoded(tokenizer, _needle_text(n, boundary, True)) for n in needles]
    overhead = len(render(tokenizer, "", question, style == "completion")) + 1
    room = length - overhead - sum(map(len, inserts))
    hay = _encoded(tokenizer, haystack)
    if room < 16:
        raise CKVError(f"length {length} leaves no room for the haystack: ask for more tokens")
    hay = (hay * (room // len(hay) + 1))[:room]
    context = list(hay)
    for needle, depth in sorted(zip(needles, depths), key=lambda p: -p[1]):
        at = _sentence_start(tokenizer, context, len(hay) * depth // 100, boundary)
        context[at:at] = _encoded(tokenizer, _needle_text(needle, boundary, at > 0))
    document, q = split_prompt(tokenizer, tokenizer.decode(context), question, style == "completion")
    return NeedlePrompt(document, q, needles[0], depths[0])


def _needle_text(needle: Needle, boundary: str, after_text: bool) -> str:
    """The needle as inserted: after a space within a line; on a line of its own at a line
    start, or where a sentence needle opens the text (so it never runs into the next word)."""
    if boundary == "line" or (boundary == "sentence" and not after_text):
        return needle.needle + "\n"
    return " " + needle.needle


def _sentence_start(tokenizer, tokens: list[int], at: int, boundary: str = "period") -> int:
    """Move ``at`` back to the nearest position where a needle may start; 0 if none. At
    the end a sentence needle is appended (the reference's rule); a line needle too,
    when the text ends a line."""
    if at >= len(tokens):
        at = len(tokens)
        if boundary != "line" or not tokens or tokenizer.decode([tokens[-1]]).endswith("\n"):
            return at
    while at > 0 and not _starts_here(tokenizer, tokens, at, boundary):
        at -= 1
    return at


def _starts_here(tokenizer, tokens: list[int], at: int, boundary: str) -> bool:
    """Whether a needle may go before ``tokens[at]``: after a token ending in '.'
    (``period``, the reference's rule), after one followed by white space (``sentence``:
    not inside ``a.b``), or after a line end (``line``)."""
    before = tokenizer.decode([tokens[at - 1]])
    if boundary == "line":
        return before.endswith("\n")
    ends = before.rstrip().endswith(".")
    if boundary == "period" or not ends or before != before.rstrip():
        return ends
    return tokenizer.decode([tokens[at]])[:1].isspace()


def answer_span(prompt: list[int], target: list[int]) -> range | None:
    """The first window of ``len(target)`` prompt tokens whose token set covers more
    than 90 % of ``target``'s token set (method doc section 1)."""
    wanted, n = set(target), len(target)
    for start in range(len(prompt) - n + 1):
        if len(wanted & set(prompt[start : start + n])) > SPAN_COVERAGE * len(wanted):
            return range(start, start + n)
    return None


_ROUGE = rouge_scorer.RougeScorer(["rouge1"])


def rouge1_recall(answer: str, reference: str) -> float:
    """ROUGE-1 recall of ``answer`` against ``reference`` (Google's rouge-score)."""
    return _ROUGE.score(reference, answer)["rouge1"].recall


def exact_match(answer: str, needle: Needle) -> bool:
    return needle.match.lower() in answer.lower()
