"""Word boundaries for ``wordN``: which tokens begin words (checked against the text's own
white space), and the session knowing its rows' tokens on every path a prompt takes."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from ckv_mlx.disk.store import StoreWriter
from ckv_mlx.engine.reselection import read_or_reuse
from ckv_mlx.engine.session import Session
from ckv_mlx.policy.methods import make_method
from ckv_mlx.text.words import word_ids, word_starts
from test_chat_engine import smollm_tokenizer
from tiny import mac_model, tiny_model

TEXT = "Ship order 3f2a8c1e-4b5d-4e6f-8a9b-0c1d2e3f4a5b to Helena Marsh, room 92813, by Friday."


def groups(tokenizer, tokens: list[int], words: np.ndarray) -> list[str]:
    return [tokenizer.decode([t for t, w in zip(tokens, words) if w == n]).strip() for n in range(words.max() + 1)]


def test_words_are_the_texts_own_white_space_separated_words():
    tokenizer = smollm_tokenizer()
    tokens = tokenizer.encode(TEXT, add_special_tokens=False)
    words = word_ids(word_starts(tokenizer), tokens)
    assert groups(tokenizer, tokens, words) == TEXT.split()
    assert word_starts(object()) is None  # a tokenizer that cannot show its tokens: no words


def recorded_words(session, monkeypatch) -> list:
    """The ``words`` each selection of ``session``'s method is given, from now on."""
    seen, real = [], type(session.method).keep_indices

    def spy(self, layer, queries, keys, scale, budget, sinks=None, visible=None, words=None, heads=None):
        seen.append(words)
        return real(self, layer, queries, keys, scale, budget, sinks, visible, words, heads)

    monkeypatch.setattr(type(session.method), "keep_indices", spy)
    return seen


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("path", ["read", "stored", "stored-unknown"])
def test_the_session_gives_each_selection_its_rows_words(tmp_path, monkeypatch, path, dtype):
    """In float32, and as a Mac runs it (4-bit weights, bf16 or fp16)."""
    tokenizer = smollm_tokenizer()
    model = tiny_model("llama", layers=2, vocab=49152) if dtype == "float32" else \
        mac_model("llama", dtype, layers=2, vocab=49152)
    session = Session(model, tokenizer, make_method("snapkv+word8")[0])
    document = tokenizer.encode(" ".join([TEXT] * 12), add_special_tokens=False)
    question = tokenizer.encode(" Which room?", add_special_tokens=False)
    if path == "read":
        session.feed(document + question)
        seen = recorded_words(session, monkeypatch)
        session.compress(64)
    else:
        writer = StoreWriter(tmp_path, "doc", len(session.caches))
        session.prefill(document, store=writer)
        writer.publish(session.remembered_queries())
        session.reset()
        full = read_or_reuse(session, tmp_path, "doc", "doc", lambda w: None, print,
                             tokens=document if path == "stored" else None)
        seen = recorded_words(session, monkeypatch)
        session.forget_rows()
        session.reselect(question, full, 64)
        full.close()
    assert len(seen) == len(session.caches)
    if path == "stored-unknown":
        assert all(w is None for w in seen)  # tokens unknown: as without the option
        return
    tokens = document + question
    for words in seen:
        assert groups(tokenizer, tokens, np.array(words)) == tokenizer.decode(tokens).split()


def test_the_mlx_lm_cache_warns_that_it_selects_without_words():
    from ckv_mlx import make_prompt_cache

    with pytest.warns(UserWarning, match="wordN needs the prompt's tokens"):
        caches = make_prompt_cache(tiny_model("llama", layers=2), method="snapkv+word8", budget=64)
    assert caches
