"""Attention taps: small callables a :class:`WindowAttention` runs on every call.

A tap gets ``(attention, queries, keys, values, out)`` (post-RoPE, the whole cache, the
per-head output before ``o_proj``) and returns the output to use. Taps act on single
token steps (decoding) only. The profiler records attention with them, the ablation masks
heads; the model itself is never changed.
"""

from __future__ import annotations

from contextlib import contextmanager

import mlx.core as mx


def decode_probs(attention, queries: mx.array, keys: mx.array) -> mx.array:
    """Attention probabilities of one decode step, ``[n_heads, N]`` float32 (a layer's
    learned sinks, if any, take their share, as in its attention)."""
    n_heads, kv_heads = attention.n_heads, attention.n_kv_heads
    q = queries[0, :, -1].astype(mx.float32).reshape(kv_heads, n_heads // kv_heads, 1, -1)
    k = keys[0].astype(mx.float32)[:, None]
    logits = ((q * attention.scale) @ k.swapaxes(-1, -2)).reshape(n_heads, -1)
    if attention.sinks is None:
        return mx.softmax(logits, axis=-1, precise=True)
    sinks = attention.sinks.astype(mx.float32)[:, None]
    return mx.exp(logits - mx.logaddexp(mx.logsumexp(logits, axis=-1, keepdims=True), sinks))


class SpanRecorder:
    """Per decode step: each head's attention mass on ``span`` and its most-attended row."""

    def __init__(self, span: range):
        self.span = span
        self.mass: list[mx.array] = []
        self.argmax: list[mx.array] = []

    def __call__(self, attention, queries, keys, values, out):
        if queries.shape[2] == 1:
            probs = decode_probs(attention, queries, keys)
            self.mass.append(probs[:, self.span.start : self.span.stop].sum(axis=-1))
            self.argmax.append(mx.argmax(probs, axis=-1))
        return out


class LayerError:
    """Relative error of this layer's output (after ``o_proj``) when it attends only to
    ``keep`` (rows of the prompt) plus every row after the prompt; the full output is
    passed on, so errors never compound across layers."""

    def __init__(self, keep: mx.array, prompt_length: int):
        self.keep, self.prompt_length = keep.reshape(-1), prompt_length
        self.errors: list[mx.array] = []

    def __call__(self, attention, queries, keys, values, out):
        if queries.shape[2] != 1:
            return out
        rows = mx.concatenate([self.keep, mx.arange(self.prompt_length, keys.shape[2])])
        kept = mx.fast.scaled_dot_product_attention(
            queries, keys[:, :, rows], values[:, :, rows], scale=attention.scale, sinks=attention.sinks
        )
        full, sel = (attention.o_proj(o.transpose(0, 2, 1, 3).reshape(1, 1, -1)).astype(mx.float32)
                     for o in (out, kept))
        error = mx.linalg.norm(sel - full) / (mx.linalg.norm(full) + 1e-5)  # float32 whatever the model's dtype
        self.errors.append(error)
        return out


class HeadMask:
    """Uniform attention for the given query heads: their output becomes the mean of
    their KV head's values (the paper's masking ablation)."""

    def __init__(self, heads: list[int]):
        self.heads = heads

    def __call__(self, attention, queries, keys, values, out):
        if queries.shape[2] != 1 or not self.heads:
            return out
        group = attention.n_heads // attention.n_kv_heads
        uniform = mx.repeat(values.mean(axis=2, keepdims=True), group, axis=1).astype(out.dtype)
        masked = mx.zeros((attention.n_heads,), dtype=mx.bool_)
        masked[mx.array(self.heads)] = True
        return mx.where(masked[None, :, None, None], uniform, out)


@contextmanager
def tapped(attentions: list, taps: list):
    """Install one tap per layer (None for none) for the duration of a ``with`` block."""
    for attention, tap in zip(attentions, taps):
        attention.tap = tap
    try:
        yield taps
    finally:
        for attention in attentions:
            attention.tap = None
