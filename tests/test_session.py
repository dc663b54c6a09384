"""The session's own invariants: prefill pieces, the window's owner, the pipelined decode."""

from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest

from ckv_mlx.kv.cache import EvictingKVCache
from ckv_mlx.errors import CKVError
from ckv_mlx.policy.methods import make_method
from ckv_mlx.engine.session import Session
from fakes import fake_profile
from tiny import TinyTokenizer, plain_greedy, tiny_model


def tokens(n, seed=3):
    mx.random.seed(seed)
    return mx.random.randint(1, 128, (n,)).tolist()


def piece_sizes(session):
    """Record the length of every model call the session makes."""
    sizes, model = [], session.model
    session.model = lambda x, cache: sizes.append(x.shape[1]) or model(x, cache=cache)
    return sizes


def test_prefill_chunk_reaches_the_whole_prefill():
    session = Session(tiny_model(), TinyTokenizer(), make_method("full")[0])
    sizes = piece_sizes(session)
    session.prefill(tokens(250), chunk=100)
    assert sizes == [100, 100, 49, 1]


def test_interrupted_bounded_prefill_restores_region_and_step():
    session = Session(tiny_model(), TinyTokenizer(), make_method("snapkv")[0], region=12)
    read, calls = session._read_piece, []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        read(*args)

    session._read_piece = interrupted
    with pytest.raises(KeyboardInterrupt):
        session.prefill(tokens(300), working_budget=40, chunk=48)
    assert [(c.region, c.step) for c in session.caches] == [(12, EvictingKVCache.step)] * 2


def windowed(model, window):
    profile = fake_profile(model)
    profile.defaults = replace(profile.defaults, window=window)
    return make_method("compresskv", profile)[0]


def kept_rows(session, budget):
    session.compress(budget)
    return [np.array(c.keys_and_values()[0]) for c in session.caches]


def selects_like_a_fresh_session(session, method, budget=32):
    """``session`` compresses to the rows a session built with ``method`` from the start keeps."""
    fresh = Session(tiny_model(), TinyTokenizer(), method)
    fresh.prefill(tokens(200))
    for a, b in zip(kept_rows(session, budget), kept_rows(fresh, budget)):
        np.testing.assert_array_equal(a, b)


def test_method_with_a_smaller_window_is_reinstalled_and_selects_like_a_fresh_session():
    model = tiny_model()
    session = Session(model, TinyTokenizer(), windowed(model, 8))
    session.prefill(tokens(200))
    session.method = windowed(model, 4)
    assert session.window == 4 and all(a.window_queries.shape[1] == 4 for a in session.attentions)
    selects_like_a_fresh_session(session, windowed(model, 4))


def test_method_with_a_wider_window_is_refused_after_reading_and_installed_before():
    model = tiny_model()
    session = Session(model, TinyTokenizer(), windowed(model, 8))
    session.method = windowed(model, 16)  # nothing read yet: re-installed
    assert session.window == 16
    session.prefill(tokens(200))
    assert all(a.window_queries.shape[1] == 16 for a in session.attentions)
    session.compress(48)  # a 16-token window keeps its own 16 rows, inside the buffer

    model = tiny_model()  # the attention of the model above remembers 16 queries from now on
    session = Session(model, TinyTokenizer(), windowed(model, 8))
    session.prefill(tokens(200))
    with pytest.raises(CKVError) as error:
        session.method = windowed(model, 16)
    assert "16-token window" in str(error.value) and "only the last 8 queries" in str(error.value)
    assert "\n" not in str(error.value) and session.window == 8


class StopTokenizer:
    def __init__(self, eos):
        self.eos_token_ids = {eos}


def test_pipelined_decode_matches_mlx_lm_and_stops_at_eos_without_feeding_it():
    prompt = tokens(60)
    expected = plain_greedy(tiny_model(), prompt, 12)
    eos = expected[7]
    stop_at = expected.index(eos)
    session = Session(tiny_model(), StopTokenizer(eos), make_method("full")[0])
    out = list(session.generate(session.prefill(prompt), 12))
    assert out == expected[:stop_at]
    assert session.position == len(prompt) + stop_at  # the EOS is not in the cache

    reference = Session(tiny_model(), TinyTokenizer(), make_method("full")[0])
    reference.prefill(prompt + out)
    for a, b in zip(session.attentions, reference.attentions):
        assert mx.allclose(a.window_queries, b.window_queries, atol=1e-5)


def test_a_stop_request_leaves_exactly_the_yielded_tokens_in_the_cache():
    prompt = tokens(60)
    session = Session(tiny_model(), TinyTokenizer(), make_method("snapkv")[0])
    logits = session.prefill(prompt)
    session.compress(32)
    out = []
    for token in session.generate(logits, 50, should_stop=lambda: len(out) == 5):
        out.append(token)
    assert len(out) == 5 and session.position == len(prompt) + 5 and session.consistent


def test_closing_the_generator_keeps_every_yielded_token():
    session = Session(tiny_model(), TinyTokenizer(), make_method("full")[0])
    stream = session.generate(session.prefill(tokens(40)), 50)
    taken = [next(stream) for _ in range(3)]
    stream.close()
    assert len(taken) == 3 and session.position == 43


def penalised_greedy(model, prompt, n, penalty, context=20):
    """Greedy decoding with the CTRL repetition penalty on the answer's last tokens,
    computed in NumPy over plain mlx-lm logits."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    logits = np.array(model(mx.array([prompt]), cache=cache)[0, -1])
    out = []
    for _ in range(n):
        recent = list(set(out[-context:]))
        logits[recent] = np.where(logits[recent] < 0, logits[recent] * penalty, logits[recent] / penalty)
        out.append(int(np.argmax(logits)))
        logits = np.array(model(mx.array([[out[-1]]]), cache=cache)[0, -1])
    return out


def test_repetition_penalty_matches_the_numpy_reference():
    prompt = tokens(30)
    session = Session(tiny_model(), TinyTokenizer(), make_method("full")[0])
    ours = list(session.generate(session.prefill(prompt), 40, repetition_penalty=20.0))
    assert ours == penalised_greedy(tiny_model(), prompt, 40, 20.0)
    assert ours != plain_greedy(tiny_model(), prompt, 40)  # the penalty changed something


def test_a_narrower_window_and_back_over_one_snapshot():
    model = tiny_model()
    session = Session(model, TinyTokenizer(), windowed(model, 8))
    session.prefill(tokens(200))
    document = session.snapshot()
    session.method = windowed(model, 4)
    session.restore(document)  # queries saved under the 8-token window
    selects_like_a_fresh_session(session, windowed(model, 4))
    session.restore(document)
    session.method = windowed(model, 8)  # the 8 queries read are still there
    selects_like_a_fresh_session(session, windowed(model, 8))


def test_queries_kept_for_every_method_let_a_wider_one_compress_after_reading():
    model = tiny_model()
    session = Session(model, TinyTokenizer(), windowed(model, 8))
    session.keep_queries_for([windowed(model, 8), windowed(model, 16)])
    session.prefill(tokens(200))
    assert session.window == 8 and session.attentions[0].queries_held == 16
    session.method = windowed(model, 16)
    selects_like_a_fresh_session(session, windowed(model, 16), budget=48)
