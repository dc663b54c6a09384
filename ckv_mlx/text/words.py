"""Which tokens begin a word: what a selection needs to keep a number, a code or a UUID
whole (the ``wordN`` option). A token begins a word when its text starts with white
space (BPE's ``Ġ``/``Ċ``, SentencePiece's ``▁``) or it is a special token; the tokens
after it, up to the next such token, are the rest of the word.
"""

from __future__ import annotations

import numpy as np

WORD_MARKS = (" ", "\n", "\t", "\u0120", "\u010a", "\u0109", "\u2581")  # space, newline, tab; Ġ Ċ ĉ; ▁


def word_starts(tokenizer) -> np.ndarray | None:
    """Per vocabulary id, whether the token begins a word; None when the tokenizer cannot
    show its tokens' text."""
    convert = getattr(tokenizer, "convert_ids_to_tokens", None)
    vocab = getattr(tokenizer, "get_vocab", None)
    if convert is None or vocab is None:
        return None
    size = max(vocab().values()) + 1
    special = set(getattr(tokenizer, "all_special_ids", ()))
    pieces = convert(list(range(size)))
    return np.array([i in special or not piece or piece[:1] in WORD_MARKS for i, piece in enumerate(pieces)])


def word_ids(starts: np.ndarray, tokens: list[int]) -> np.ndarray:
    """Each token's word, numbered from 0 (the first token, and an id past the
    vocabulary, begin one)."""
    ids = np.asarray(tokens, dtype=np.int64)
    begins = np.where(ids < len(starts), starts[np.minimum(ids, len(starts) - 1)], True)
    begins[:1] = True
    return np.cumsum(begins) - 1
