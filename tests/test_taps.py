"""Attention taps against NumPy attention computed from the same queries, keys and values."""

import mlx.core as mx
import numpy as np

from ckv_mlx.policy.methods import make_method
from ckv_mlx.engine.session import Session
from ckv_mlx.profile.taps import HeadMask, LayerError, SpanRecorder, decode_probs, tapped
from tiny import TinyTokenizer, tiny_model

HEADS, KV_HEADS, DIM = 4, 2, 16


def numpy_attention(q, k, v, scale, rows=None):
    """Per-head softmax attention of one query row: q [H, d], k/v [Hkv, N, d]."""
    group = q.shape[0] // k.shape[0]
    k, v = np.repeat(k, group, axis=0), np.repeat(v, group, axis=0)
    if rows is not None:
        k, v = k[:, rows], v[:, rows]
    logits = np.einsum("hd,hnd->hn", q, k) * scale
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return p, np.einsum("hn,hnd->hd", p, v)


class Capture:
    """A tap that keeps the arrays it saw (and passes the output on)."""

    def __init__(self, inner=None):
        self.inner, self.seen = inner, []

    def __call__(self, attention, queries, keys, values, out):
        result = self.inner(attention, queries, keys, values, out) if self.inner else out
        if queries.shape[2] == 1:
            self.seen.append([np.array(a) for a in (queries[0, :, 0], keys[0], values[0], out[0, :, 0], result[0, :, 0])])
        return result


def decoded_session(prompt_len=40):
    model = tiny_model("llama", layers=2, heads=HEADS, kv_heads=KV_HEADS, head_dim=DIM)
    session = Session(model, TinyTokenizer(), make_method("full")[0])
    mx.random.seed(3)
    prompt = mx.random.randint(1, 128, (prompt_len,)).tolist()
    session.feed(prompt[:-1])
    return session, prompt


def test_decode_probs_reproduce_the_attention_output():
    session, prompt = decoded_session()
    attention = session.attentions[0]
    capture = Capture()
    with tapped(session.attentions, [capture, None]):
        session.feed(prompt[-1:])
    q, k, v, out, _ = capture.seen[0]
    probs = np.array(decode_probs(attention, mx.array(q)[None, :, None], mx.array(k)[None]))
    ref_p, ref_out = numpy_attention(q, k, v, attention.scale)
    np.testing.assert_allclose(probs, ref_p, atol=1e-5)
    np.testing.assert_allclose(out, ref_out, atol=1e-4)


def test_span_recorder_mass_and_argmax():
    session, prompt = decoded_session()
    span = range(10, 17)
    recorder = SpanRecorder(span)
    capture = Capture(recorder)
    with tapped(session.attentions, [capture, None]):
        logits = session.feed(prompt[-1:])
        for i, _ in enumerate(session.generate(logits, 3)):
            pass
    assert len(recorder.mass) == len(capture.seen) == 4  # the last prompt token and 3 answer tokens
    for step, (q, k, v, _, _) in enumerate(capture.seen):
        p, _ = numpy_attention(q, k, v, session.attentions[0].scale)
        np.testing.assert_allclose(np.array(recorder.mass[step]), p[:, 10:17].sum(-1), atol=1e-5)
        assert np.array(recorder.argmax[step]).tolist() == p.argmax(-1).tolist()


def test_layer_error_is_zero_with_every_row_and_matches_numpy_with_fewer():
    session, prompt = decoded_session()
    attention = session.attentions[1]
    keep = mx.array([0, 5, 9, 30, 38])
    partial, whole = LayerError(keep, len(prompt)), LayerError(mx.arange(len(prompt)), len(prompt))
    both = Capture(lambda *a: whole(*a[:4], partial(*a)))
    with tapped(session.attentions, [None, both]):
        logits = session.feed(prompt[-1:])
        list(session.generate(logits, 2))
    assert max(e.item() for e in whole.errors) < 1e-5
    for step, (q, k, v, out, _) in enumerate(both.seen):
        rows = [0, 5, 9, 30, 38] + list(range(len(prompt), k.shape[1]))
        _, sel = numpy_attention(q, k, v, attention.scale, rows)
        w = np.array(attention.o_proj.weight)
        full_o, sel_o = w @ out.reshape(-1), w @ sel.reshape(-1)
        expected = np.linalg.norm(sel_o - full_o) / (np.linalg.norm(full_o) + 1e-5)
        assert abs(partial.errors[step].item() - expected) < 1e-4
        assert expected > 1e-3


def test_head_mask_gives_masked_heads_the_mean_value_and_leaves_others():
    session, prompt = decoded_session()
    capture = Capture(HeadMask([1, 2]))
    with tapped(session.attentions, [capture, None]):
        session.feed(prompt[-1:])
    q, k, v, out, masked = capture.seen[0]
    group = HEADS // KV_HEADS
    for head in range(HEADS):
        if head in (1, 2):
            np.testing.assert_allclose(masked[head], v[head // group].mean(0), atol=1e-5)
        else:
            np.testing.assert_allclose(masked[head], out[head], atol=0)


def test_tapped_removes_taps_even_after_an_error():
    session, _ = decoded_session()
    try:
        with tapped(session.attentions, [SpanRecorder(range(1)), None]):
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert all(a.tap is None for a in session.attentions)
