"""Turn a document and a question into prompt tokens that fit the model's context."""

from __future__ import annotations

from typing import Callable

from ..errors import CKVError

TRUNCATE_CHOICES = ("none", "start", "middle", "end")
ANSWER_MARK = "\u27e6ckv-answer\u27e7"  # stands in for the last answer when rendering a follow-up


def render(tokenizer, document: str, question: str, raw: bool) -> list[int]:
    """Prompt tokens: chat-templated, or (``raw``) the document, a newline, the question."""
    if raw:
        return tokenizer.encode(f"{document}\n{question}" if document else question)
    messages = chat_messages(document, [], question)
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))


def question_tail(tokenizer, tokens: list[int], question: str, raw: bool) -> list[int]:
    """The end of prompt ``tokens`` that does not depend on the document: the question
    and whatever the template puts after it (what a bounded prefill scores chunks by)."""
    bare = render(tokenizer, "", question, raw)
    n = 0
    while n < min(len(bare), len(tokens)) and bare[-1 - n] == tokens[-1 - n]:
        n += 1
    return tokens[len(tokens) - n :]


def chat_messages(document: str, turns: list[tuple[str, str]], question: str) -> list[dict]:
    """A chat about ``document``, which opens the first user message; ``turns`` are the
    earlier (question, answer) pairs."""
    messages = []
    for i, (q, answer) in enumerate([*turns, (question, None)]):
        content = f"{document}\n\n{q}" if i == 0 and document else q
        messages.append({"role": "user", "content": content})
        if answer is not None:
            messages.append({"role": "assistant", "content": answer})
    return messages


def document_prefix(tokenizer, document: str, raw: bool = False) -> list[int]:
    """The prompt tokens that every first question about ``document`` starts with:
    what to prefill before any question is known (and what a stored cache holds)."""
    a, b = (render(tokenizer, document, q, raw) for q in ("A?", "B?"))
    return a[: _shared(a, b)]


def question_tokens(
    tokenizer, document: str, prefix: list[int], turns: list[tuple[str, str]], question: str
) -> list[int]:
    """What to feed for ``question``: after the :func:`document_prefix` ``prefix`` on the
    first turn, else what the template puts after the last answer of ``turns`` (closing
    that turn, then the question). Only that: the answer is in the cache as generated,
    even if the template rewrites earlier answers (Qwen3's drops their <think> blocks)."""
    if not turns:
        full = render(tokenizer, document, question, raw=False)
        if full[: len(prefix)] != prefix:
            raise CKVError("the question merges with the end of the document when tokenised; "
                           "start it with a word")
        return full[len(prefix) :]
    *earlier, (last_question, _) = turns
    text = _chat_text(tokenizer, chat_messages(document, [*earlier, (last_question, ANSWER_MARK)], question))
    if text.count(ANSWER_MARK) != 1:
        raise CKVError("the model's chat template does not show the last answer as written, so a follow-up "
                       "cannot continue it: open the document again with /doc for each question")
    return tokenizer.encode(text[text.index(ANSWER_MARK) + len(ANSWER_MARK) :], add_special_tokens=False)


def _chat_text(tokenizer, messages: list[dict]) -> str:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def _shared(a, b) -> int:
    """Length of the common prefix of two sequences."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def prompt_tokens(
    tokenizer,
    document: str,
    question: str,
    *,
    raw: bool,
    context_length: int,
    reserve: int,
    truncate: str = "none",
) -> tuple[list[int], int]:
    """The prompt, and how many document tokens were dropped to fit.

    ``reserve`` tokens are kept free for the answer. A prompt that does not fit is
    refused unless ``truncate`` says which part of the document to drop.
    """
    tokens = render(tokenizer, document, question, raw)
    if len(tokens) + reserve <= context_length:
        return tokens, 0
    if truncate == "none" or not document:
        raise CKVError(
            f"the prompt is {len(tokens):,} tokens + {reserve:,} to generate, over the "
            f"model's context of {context_length:,}: pass --truncate middle (or start, "
            "end) to drop part of the document, or use a model with a longer context"
        )
    def size(text: str) -> int:
        return len(render(tokenizer, text, question, raw))

    document, dropped = cut_to_fit(tokenizer, document, size, context_length - reserve, truncate)
    return render(tokenizer, document, question, raw), dropped


def cut_to_fit(tokenizer, document: str, size: Callable[[str], int], room: int, where: str) -> tuple[str, int]:
    """``document`` with tokens dropped at ``where`` (start, middle, end) until the prompt
    made of it, ``size(document)`` tokens, is at most ``room``; and how many were dropped."""
    tokens = tokenizer.encode(document, add_special_tokens=False)
    dropped, overflow = 0, size(document) - room
    while overflow > 0:
        cut = overflow + 8  # decoding and encoding again can shift a token or two
        tokens = _cut(tokens, cut, where)
        dropped += cut
        document = tokenizer.decode(tokens)
        overflow = size(document) - room
    return document, dropped


def _cut(tokens: list[int], n: int, where: str) -> list[int]:
    if n >= len(tokens):
        raise CKVError("nothing of the document would be left: the rest of the prompt and the answer fill the "
                       "model's context; shorten the question or ask for a shorter answer")
    if where == "start":
        return tokens[n:]
    if where == "end":
        return tokens[:-n]
    if where == "middle":
        head = (len(tokens) - n) // 2
        return tokens[:head] + tokens[head + n :]
    raise CKVError(f"unknown --truncate {where!r}: use one of {', '.join(TRUNCATE_CHOICES)}")


def split_prompt(tokenizer, document: str, question: str, raw: bool) -> tuple[list[int], list[int]]:
    """:func:`render`'s tokens split into the document part and the question part.

    The first part is the longest prefix shared with the same prompt without a question,
    so one prefill of it serves every question; the two parts concatenate exactly to
    :func:`render`. The question part holds at least one token.
    """
    full = render(tokenizer, document, question, raw)
    bare = render(tokenizer, document, "", raw)
    shared = min(_shared(full, bare), len(full) - 1)
    return full[:shared], full[shared:]
