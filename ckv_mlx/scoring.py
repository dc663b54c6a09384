"""Observation-window scoring: pure functions over one layer's queries and keys.

Shapes (batch dimension dropped): window queries ``[Hq, w, d]`` post-RoPE, keys
``[Hkv, N, d]`` post-RoPE, with the window's own keys as the last ``w`` rows.
"""

from __future__ import annotations

import mlx.core as mx


def window_probs(
    window_queries: mx.array, keys: mx.array, heads: list[int], scale: float
) -> mx.array:
    """Softmax attention of the chosen query heads' window rows over all keys.

    Returns ``[len(heads), w, N]`` float32. Window row ``r`` sees every prefix key and
    the window keys up to its own position (causal inside the window).
    """
    n_query_heads, w, dim = window_queries.shape
    kv_heads = keys.shape[0]
    grouped = window_queries.astype(mx.float32).reshape(kv_heads, -1, w, dim) * scale
    k = keys.astype(mx.float32)[:, None]
    logits = (grouped @ k.swapaxes(-1, -2)).reshape(n_query_heads, w, -1)[mx.array(heads)]
    n = keys.shape[1]
    rows = mx.arange(w)[:, None]
    cols = mx.arange(n)[None, :]
    visible = cols <= (n - w) + rows
    logits = mx.where(visible, logits, -mx.inf)
    return mx.softmax(logits, axis=-1, precise=True)


def pool(scores: mx.array, kernel: int, pooling: str = "avg") -> mx.array:
    """1-D pooling along the last axis, stride 1, same length.

    ``avg`` pads with zeros and counts them (divides by ``kernel`` everywhere), as
    PyTorch's ``avg_pool1d`` does by default; ``max`` ignores the padding.
    """
    if kernel <= 1:
        return scores
    pad = kernel // 2
    fill = 0.0 if pooling == "avg" else -mx.inf
    padded = mx.pad(scores, [(0, 0), (pad, pad)], constant_values=fill)
    n = scores.shape[-1]
    shifted = [padded[:, i : i + n] for i in range(kernel)]
    if pooling == "avg":
        return sum(shifted[1:], shifted[0]) / kernel
    if pooling == "max":
        out = shifted[0]
        for s in shifted[1:]:
            out = mx.maximum(out, s)
        return out
    raise ValueError(f"unknown pooling {pooling!r}: use 'avg' or 'max'")


def head_scores(
    window_queries: mx.array,
    keys: mx.array,
    heads: list[int],
    scale: float,
    kernel: int,
    pooling: str,
) -> mx.array:
    """Pooled importance of every prefix position, one row per chosen query head.

    Sums the window rows of :func:`window_probs`, drops the window's own columns and
    pools: ``[len(heads), N - w]``.
    """
    w = window_queries.shape[1]
    probs = window_probs(window_queries, keys, heads, scale)
    prefix = probs.sum(axis=1)[:, : keys.shape[1] - w]
    return pool(prefix, kernel, pooling)


def group_mean(scores: mx.array, heads: list[int], group: int, kv_heads: int) -> mx.array:
    """Average per-head scores within each GQA group: ``[kv_heads, n]``.

    A KV head whose group has none of ``heads`` gets the mean over all of them.
    """
    overall = scores.mean(axis=0)
    rows = []
    for kv in range(kv_heads):
        members = [i for i, h in enumerate(heads) if h // group == kv]
        rows.append(scores[mx.array(members)].mean(axis=0) if members else overall)
    return mx.stack(rows)


def keep_top(scores: mx.array, budget: int, window: int) -> mx.array:
    """Indices to keep: the ``budget - window`` best prefix positions plus the window.

    ``scores`` is ``[H, N - w]`` (one row per KV head, or one row for all); returns
    sorted ``[H, budget]`` int32 positions into the ``N`` held rows.
    """
    rows, prefix = scores.shape
    top = budget - window
    best = mx.argpartition(-scores, kth=top - 1, axis=-1)[:, :top] if top > 0 else None
    recent = mx.broadcast_to(mx.arange(prefix, prefix + window), (rows, window))
    keep = recent if best is None else mx.concatenate([best, recent], axis=-1)
    return mx.sort(keep.astype(mx.int32), axis=-1)
