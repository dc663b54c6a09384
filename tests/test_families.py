"""Families whose layers mix kinds: only the layers mlx-lm gives a growing cache
compress; mlx-lm's own caches (sliding windows, linear-attention states) go on as mlx-lm
makes them, copied with every snapshot and counted in the bytes."""

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import KVCache, make_prompt_cache

from ckv_mlx.model.families import compressible_layers
from ckv_mlx.policy.methods import METHODS, make_method
from ckv_mlx.policy.scoring import head_scores
from ckv_mlx.engine.session import Session
from fakes import fake_profile
from reference import pooled_scores, window_probs
from tiny import MIXED_ARGS, TinyTokenizer, plain_greedy, plain_logits, session_logits, tiny_model

MIXED = list(MIXED_ARGS)


def tokens(n, seed):
    mx.random.seed(seed)
    return mx.random.randint(1, 128, (n,)).tolist()


def with_large_sinks(model):
    """gpt-oss sinks of 2-6 (mlx-lm starts them at 0): most of a row's attention mass."""
    for layer in model.layers:
        attention = layer.get("self_attn")
        if attention is not None and "sinks" in attention:
            attention.sinks = mx.linspace(2, 6, attention.sinks.size)
    return model


@pytest.mark.parametrize("arch", MIXED)
def test_only_the_growing_layers_compress_and_every_byte_is_counted(arch):
    model = tiny_model(arch, layers=4)
    session = Session(model, TinyTokenizer(), make_method("snapkv")[0], region=8)
    session.prefill(tokens(96, 1))
    budgets = session.compress(24)
    plain = make_prompt_cache(model)
    assert [type(c).__name__ for c in session.model_caches()] == [
        "EvictingKVCache" if type(c) is KVCache else type(c).__name__ for c in plain]
    compressing = len(compressible_layers(model))  # 2 of 4 (gemma4: 1, its last 2 layers reading earlier ones' KV)
    assert len(session.caches) == compressing >= 1 and budgets == [24] * compressing
    assert [c.length for c in session.caches] == [24] * compressing
    held = sum(c.keys.nbytes + c.values.nbytes for c in session.caches)
    for cache in session.others.values():  # mlx-lm's own: a window's rows, or a recurrent state
        held += sum(a.nbytes for a in (cache.state[:2] if hasattr(cache, "keys") else cache.cache))
    assert session.kv_bytes == held


@pytest.mark.parametrize("arch", MIXED)
@pytest.mark.parametrize("name", list(METHODS))
def test_nothing_to_evict_matches_plain_mlx_lm_with_large_sinks(arch, name):
    prompt, forced = tokens(48, 1), tokens(20, 2)
    reference = plain_logits(with_large_sinks(tiny_model(arch, layers=4)), prompt, forced)
    model = with_large_sinks(tiny_model(arch, layers=4))
    session = Session(model, TinyTokenizer(), make_method(name, fake_profile(model))[0], region=len(forced))
    for step, (a, b) in enumerate(zip(reference, session_logits(session, prompt, forced))):
        assert mx.allclose(a, b, atol=1e-5, rtol=1e-5), f"{arch}/{name} differs at step {step}"


def test_sinks_take_their_share_of_the_window_scores_as_in_the_spec():
    model = with_large_sinks(tiny_model("gpt_oss", layers=4, heads=4, kv_heads=2))
    session = Session(model, TinyTokenizer(), make_method("snapkv")[0])
    session.prefill(tokens(96, 3))
    heads = [0, 1, 2, 3]
    for layer, (window, cache) in zip(compressible_layers(model), zip(session.attentions, session.caches)):
        attention = model.layers[layer].self_attn
        assert window.scale == attention.sm_scale and np.array_equal(np.array(window.sinks), np.array(attention.sinks))
        q, k = np.array(window.window_queries), np.array(cache.keys_and_values()[0][0])
        ours = np.array(head_scores(window.window_queries, cache.keys_and_values()[0][0], heads, window.scale, 5, "avg", window.sinks))
        spec = pooled_scores(window_probs(q, k, heads, 2, attention.sm_scale, np.array(attention.sinks)), 8)
        without = pooled_scores(window_probs(q, k, heads, 2, attention.sm_scale), 8)
        np.testing.assert_allclose(ours, spec, rtol=1e-4, atol=1e-7)
        assert not np.allclose(spec, without, rtol=1e-2)  # the sinks do change the scores


@pytest.mark.parametrize("arch", MIXED)
def test_a_bounded_read_with_nothing_to_evict_reads_as_mlx_lm(arch):
    """The question read after each chunk (then taken back) must not stay in a sliding
    window or a recurrent state, which mlx-lm cannot trim: they are put back."""
    prompt, question = tokens(100, 4), tokens(12, 5)
    model = tiny_model(arch, layers=4)
    session = Session(model, TinyTokenizer(), make_method("snapkv")[0])
    logits = session.prefill(prompt, working_budget=128, chunk=32, question=question)
    assert mx.allclose(logits, plain_logits(model, prompt, [])[0], atol=1e-5)
    assert list(session.generate(logits, 6)) == plain_greedy(model, prompt, 6)


@pytest.mark.parametrize("arch", MIXED)
def test_a_snapshot_keeps_mlx_lms_caches_apart(arch):
    """Per question, the document's snapshot is restored: a rotating window written in
    place by one question must not leak into the next."""
    document, question = tokens(60, 6), tokens(10, 7)
    model = tiny_model(arch, layers=4)
    session = Session(model, TinyTokenizer(), make_method("snapkv")[0])
    session.prefill(document)
    snapshot = session.snapshot()
    answers = []
    for _ in range(2):
        session.restore(snapshot)
        answers.append(list(session.generate(session.feed(question), 8)))
    assert answers[0] == answers[1] == plain_greedy(model, document + question, 8)


def test_a_decode_steps_attention_counts_the_sinks_as_the_spec():
    """What the profiler records of a decode step (taps.decode_probs) on gpt-oss."""
    from ckv_mlx.profile.taps import decode_probs, tapped

    model = with_large_sinks(tiny_model("gpt_oss", layers=4, heads=4, kv_heads=2))
    session = Session(model, TinyTokenizer(), make_method("snapkv")[0])
    seen = []

    def record(window, queries, keys, values, out):
        seen.append((np.array(decode_probs(window, queries, keys)), np.array(queries[0, :, -1:]), np.array(keys[0])))
        return out

    logits = session.prefill(tokens(40, 9))
    with tapped(session.attentions, [record] * len(session.attentions)):
        list(session.generate(logits, 1))
    layers = compressible_layers(model)
    assert len(seen) == len(layers)
    for (probs, q, k), layer in zip(seen, layers):
        attention = model.layers[layer].self_attn
        spec = window_probs(q, k, [0, 1, 2, 3], 2, attention.sm_scale, np.array(attention.sinks))[:, 0]
        np.testing.assert_allclose(probs, spec, rtol=1e-4, atol=1e-7)
        assert (probs.sum(axis=-1) < 0.9).all()  # each head's sink took its share


def test_the_shape_is_the_compressing_layers_own():
    """Gemma 4's full layers are wider than its sliding ones (global_head_dim 32, not 16)."""
    from ckv_mlx.model.models import model_shape

    shape = model_shape(tiny_model("gemma4_text", layers=4), "tiny-gemma4")
    assert (shape.layers, shape.compressed_layers, shape.total_layers, shape.head_dim) == (1, (1,), 4, 32)
