"""Turn a document and a question into prompt tokens that fit the model's context."""

from __future__ import annotations

from .errors import CKVError

TRUNCATE_CHOICES = ("none", "start", "middle", "end")


def render(tokenizer, document: str, question: str, raw: bool) -> list[int]:
    """Prompt tokens: chat-templated, or (``raw``) the document, a newline, the question."""
    if raw:
        return tokenizer.encode(f"{document}\n{question}" if document else question)
    content = f"{document}\n\n{question}" if document else question
    messages = [{"role": "user", "content": content}]
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))


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
    overflow = len(tokens) + reserve - context_length
    if overflow <= 0:
        return tokens, 0
    if truncate == "none" or not document:
        raise CKVError(
            f"the prompt is {len(tokens):,} tokens + {reserve:,} to generate, over the "
            f"model's context of {context_length:,}: pass --truncate middle (or start, "
            "end) to drop part of the document, or use a model with a longer context"
        )
    doc = tokenizer.encode(document, add_special_tokens=False)
    dropped = 0
    while overflow > 0:
        cut = overflow + 8
        doc = _cut(doc, cut, truncate)
        dropped += cut
        tokens = render(tokenizer, tokenizer.decode(doc), question, raw)
        overflow = len(tokens) + reserve - context_length
    return tokens, dropped


def _cut(tokens: list[int], n: int, where: str) -> list[int]:
    if n >= len(tokens):
        raise CKVError("the question alone does not fit the model's context: shorten it")
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
    shared = next((i for i, (a, b) in enumerate(zip(full, bare)) if a != b), min(len(full), len(bare)))
    shared = min(shared, len(full) - 1)
    return full[:shared], full[shared:]
