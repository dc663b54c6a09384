"""Prefill each document once, then answer its questions under many (method, budget)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from ..policy.methods import make_method
from ..text.prompts import split_prompt
from ..engine.session import Session


@dataclass(frozen=True)
class Case:
    """A question about a document, and a string the right answer contains."""

    document: str
    question: str
    expected: str


def sweep(
    loaded, cases: list[Case], methods: list[str], budgets: list[int], raw: bool = True, max_tokens: int = 12, profile=None
) -> Iterator[dict]:
    """One record per case, method and budget (``full`` once per case), with the KV bytes
    allocated after the answer and what a full cache of as many tokens allocates.

    Cases that share a document share its prefill.
    """
    session = Session(loaded.model, loaded.tokenizer, make_method("full")[0])
    chosen = {name: make_method(name, profile)[0] for name in methods}
    session.keep_queries_for(list(chosen.values()))
    document = prefilled = None
    for index, case in enumerate(cases):
        prefix, question = split_prompt(loaded.tokenizer, case.document, case.question, raw)
        if case.document != document:
            session.reset()
            session.feed(prefix)
            document, prefilled = case.document, session.snapshot()
        for name, method in chosen.items():
            for budget in [None] if not method.compresses else budgets:
                tokens = session.answer(prefilled, method, budget, question, max_tokens)
                text = loaded.tokenizer.decode(tokens)
                yield {
                    "case": index,
                    "method": name,
                    "budget": budget,
                    "prompt_tokens": len(prefix) + len(question),
                    "text": text,
                    "correct": case.expected.lower() in text.lower(),
                    "kv_bytes": session.kv_bytes,
                    "full_bytes": session.full_bytes,
                }
