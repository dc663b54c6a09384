"""Bounded-memory prefill: chunks that compress as they go, checked against plain mlx-lm
and a NumPy simulation of the eviction on layer 0 (whose keys no eviction can change)."""

import mlx.core as mx
import numpy as np
import pytest

from ckv_mlx.errors import CKVError
from ckv_mlx.engine.memory import kv_bytes_per_token, parse_size, working_budget
from ckv_mlx.policy.methods import make_method
from ckv_mlx.engine.session import Session
from fakes import fake_profile
from reference import select_snapkv, select_streamingllm
from tiny import TinyTokenizer, plain_greedy, tiny_model

PROMPT, CHUNK, WORKING = 200, 48, 40


def tokens(n=PROMPT, seed=5):
    mx.random.seed(seed)
    return mx.random.randint(1, 128, (n,)).tolist()


def bounded_session(name, working=WORKING, chunk=CHUNK, prompt=None):
    model = tiny_model("llama", layers=3)
    session = Session(model, TinyTokenizer(), make_method(name)[0])
    logits = session.prefill(prompt or tokens(), working_budget=working, chunk=chunk)
    return session, logits


def layer0_queries_keys(model, prompt):
    """Post-RoPE queries and keys of layer 0 by plain mlx-lm modules: ``[H, T, d]``."""
    block = model.layers[0]
    attention = block.self_attn
    h = block.input_layernorm(model.model.embed_tokens(mx.array([prompt])))
    q = attention.q_proj(h).reshape(1, len(prompt), attention.n_heads, -1).transpose(0, 2, 1, 3)
    k = attention.k_proj(h).reshape(1, len(prompt), attention.n_kv_heads, -1).transpose(0, 2, 1, 3)
    return np.array(attention.rope(q)[0]), np.array(attention.rope(k)[0])


def test_a_working_budget_the_prompt_fits_in_changes_nothing():
    prompt = tokens(120)
    session, logits = bounded_session("snapkv", working=200, prompt=prompt)
    assert not session.compressed
    assert list(session.generate(logits, 10)) == plain_greedy(tiny_model("llama", layers=3), prompt, 10)


def test_streamingllm_keeps_the_sinks_and_the_latest_tokens():
    session, _ = bounded_session("streamingllm")
    q, k = layer0_queries_keys(session.model, tokens())
    body = PROMPT - 1
    rows = np.concatenate([select_streamingllm(body, WORKING), [PROMPT - 1]])
    cache_keys = np.array(session.caches[0].keys_and_values()[0][0])
    np.testing.assert_allclose(cache_keys, k[:, rows], atol=1e-5)


def simulated_snapkv(window_queries, k, body, working, step, window=8):
    """Positions each KV head keeps after chunked eviction, by the NumPy reference;
    ``window_queries(end)`` are the queries that score the rows read up to ``end``."""
    kept = np.zeros((k.shape[0], 0), dtype=np.int64)
    for start in range(0, body, step):
        end = min(start + step, body)
        candidates = np.concatenate([kept, np.tile(np.arange(start, end), (k.shape[0], 1))], axis=1)
        if candidates.shape[1] <= working:
            kept = candidates
            continue
        keys = np.stack([k[h, candidates[h]] for h in range(k.shape[0])])
        chosen = select_snapkv(window_queries(end), keys, working, window=window)
        kept = np.take_along_axis(candidates, chosen, axis=1)
    return kept


def assert_layer0_keeps(session, k, kept):
    cache_keys = np.array(session.caches[0].keys_and_values()[0][0])
    assert cache_keys.shape[1] == WORKING + 1  # the last token is appended after the last eviction
    for head in range(k.shape[0]):
        np.testing.assert_allclose(cache_keys[head, :WORKING], k[head, kept[head]], atol=1e-5)


def test_snapkv_evicts_chunk_by_chunk_like_the_numpy_reference():
    session, _ = bounded_session("snapkv")
    q, k = layer0_queries_keys(session.model, tokens())
    kept = simulated_snapkv(lambda end: q[:, end - 8 : end], k, PROMPT - 1, WORKING, CHUNK)
    assert_layer0_keeps(session, k, kept)
    # the simulation really evicted: the kept set is neither the first nor the last rows
    assert not np.array_equal(kept[0], np.arange(WORKING))
    assert not np.array_equal(kept[0], np.arange(PROMPT - 1 - WORKING, PROMPT - 1))


def test_a_question_scores_each_chunk_as_if_asked_right_after_it():
    """The question's layer-0 queries at the positions after each piece choose the rows
    (NumPy reference); its own rows are dropped, so positions stay those of the prompt."""
    prompt, question = tokens(), tokens(12, seed=9)
    model = tiny_model("llama", layers=3)
    session = Session(model, TinyTokenizer(), make_method("snapkv")[0])
    session.prefill(prompt, working_budget=WORKING, chunk=CHUNK, question=question)
    _, k = layer0_queries_keys(model, prompt)
    probe_queries = lambda end: layer0_queries_keys(model, prompt[:end] + question)[0][:, -8:]  # noqa: E731
    kept = simulated_snapkv(probe_queries, k, PROMPT - 1, WORKING, CHUNK - len(question))
    assert_layer0_keeps(session, k, kept)
    assert session.position == PROMPT
    own_window = simulated_snapkv(lambda end: layer0_queries_keys(model, prompt[:end])[0][:, -8:], k,
                                  PROMPT - 1, WORKING, CHUNK - len(question))
    assert not np.array_equal(kept, own_window)  # the question changed what was kept


@pytest.mark.parametrize("question", [None, [5] * 30])
@pytest.mark.parametrize("name", ["compresskv", "pyramidkv", "streamingllm"])
def test_cache_never_holds_more_than_the_working_budget_plus_a_chunk(name, question):
    model = tiny_model("llama", layers=3)
    session = Session(model, TinyTokenizer(), make_method(name, fake_profile(model))[0])
    budgets = session.layer_budgets(WORKING)
    seen = []
    evict = session._evict_to

    def watch(b):
        seen.append([(c.length, c.capacity) for c in session.caches])
        evict(b)

    session._evict_to = watch
    session.prefill(tokens(), working_budget=WORKING, chunk=CHUNK, question=question)
    assert session.position == PROMPT
    for layers in seen:
        for (length, capacity), budget in zip(layers, budgets):
            assert length <= budget + CHUNK and capacity <= budget + CHUNK
    per_token = kv_bytes_per_token(model)
    assert session.stats.kv_bytes_full == -(-PROMPT // 256) * 256 * per_token  # what a whole read allocates
    assert session.stats.peak_kv_bytes <= (sum(budgets) + 3 * CHUNK) * per_token // 3
    assert session.stats.peak_kv_bytes < session.stats.kv_bytes_full / 2
    session.compress(32)
    regions = [max(8, -(-b // 4)) for b in session.stats.layer_budgets]
    assert session.kv_bytes == (sum(session.stats.layer_budgets) + sum(regions)) * per_token // 3


def test_bytes_per_token_matches_the_cache():
    session, _ = bounded_session("snapkv")
    assert kv_bytes_per_token(session.model) == session.bytes_per_token == 3 * 2 * 2 * 16 * 4


def test_working_budget_plan():
    # 1,000 tokens read whole allocate 1,024 rows (256-row steps): 102,400 bytes at 100 a row
    assert working_budget(1000, 100, 102_400, 64, 32) is None
    assert working_budget(1000, 100, 102_399, 64, 32) == 1023 - 64
    assert working_budget(768, 100, 76_800, 64, 32) is None
    with pytest.raises(CKVError, match="too small for budget 950 .* raise the limit or lower the budget"):
        working_budget(5000, 100, 100_000, 64, 950)
    with pytest.raises(CKVError, match="method full keeps everything"):
        working_budget(5000, 100, 100_000, 64, None)


@pytest.mark.parametrize("text, size", [("512MiB", 512 * 2**20), ("2gb", 2 * 2**30), ("1.5k", 1536), ("4096", 4096)])
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "lots", "12 parsecs", "0", "-3MiB"])
def test_parse_size_refuses_nonsense(text):
    with pytest.raises(CKVError, match="memory size"):
        parse_size(text)
