"""Observation-window scoring: pure functions over one layer's queries and keys.

Shapes (batch dimension dropped): window queries ``[Hq, w, d]`` post-RoPE, keys
``[Hkv, N, d]`` post-RoPE, with the window's own keys as the last ``w`` rows.
"""

from __future__ import annotations

import math

import mlx.core as mx


SCORE_BLOCK = 512  # keys scored at once: scoring allocates [query heads, window, SCORE_BLOCK] float32
HEAD_FLOOR = 0.2  # per-head budgets: each KV head keeps at least this share of an equal split (kvpress's AdaKV)


def _block_logits(queries: mx.array, keys: mx.array, heads: mx.array, start: int, stop: int,
                  visible: mx.array | None = None) -> mx.array:
    """Float32 logits ``[len(heads), w, stop - start]`` of the window rows (``queries``,
    ``[kv_heads, group, w, d]``, already scaled) over ``keys[:, start:stop]``, the chosen
    ``heads`` only; window row ``r`` sees every prefix key and the window keys up to its
    own position (causal inside the window), and no row ``visible`` (``[kv_heads, N]``)
    marks as padding."""
    n, w = keys.shape[1], queries.shape[2]
    block = keys[:, None, start:stop].astype(mx.float32)
    logits = queries @ block.swapaxes(-1, -2)
    if visible is not None:
        logits = mx.where(visible[:, None, None, start:stop], logits, -mx.inf)
    logits = logits.reshape(-1, w, stop - start)[heads]
    if stop <= n - w:
        return logits
    visible = mx.arange(start, stop)[None, :] <= (n - w) + mx.arange(w)[:, None]
    return mx.where(visible, logits, -mx.inf)


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
    sinks: mx.array | None = None,
    visible: mx.array | None = None,
) -> mx.array:
    """Pooled importance of every prefix position, one row per chosen query head: each
    window row's softmax attention over all keys, summed over the window rows, the
    window's own columns dropped, pooled: ``[len(heads), N - w]`` float32. A layer with
    learned attention ``sinks`` (one logit per query head, as gpt-oss) gives each head's
    sink its share of the softmax, as its attention does. Padding rows (False in
    ``visible``, ``[kv_heads, N]``) take no share and score 0.

    Computed ``SCORE_BLOCK`` keys at a time in two passes (each row's log-normaliser,
    then the probabilities), so memory does not grow with N beyond the result.
    """
    _, w, dim = window_queries.shape
    n, kv_heads = keys.shape[1], keys.shape[0]
    queries = window_queries.astype(mx.float32).reshape(kv_heads, -1, w, dim) * scale
    heads = mx.array(heads)
    normaliser = None if sinks is None else mx.broadcast_to(sinks.astype(mx.float32)[heads][:, None], (heads.size, w))
    for start in range(0, n, SCORE_BLOCK):
        part = mx.logsumexp(_block_logits(queries, keys, heads, start, min(start + SCORE_BLOCK, n), visible), axis=-1)
        normaliser = part if normaliser is None else mx.logaddexp(normaliser, part)
        mx.eval(normaliser)
    sums = []
    for start in range(0, n - w, SCORE_BLOCK):
        logits = _block_logits(queries, keys, heads, start, min(start + SCORE_BLOCK, n - w), visible)
        sums.append(mx.exp(logits - normaliser[..., None]).sum(axis=1))
        mx.eval(sums[-1])
    prefix = mx.concatenate(sums, axis=-1) if sums else mx.zeros((heads.size, 0))
    return pool(prefix, kernel, pooling)


def chunked(scores: mx.array, size: int) -> mx.array:
    """ChunkKV's scores (arXiv 2502.00299): each prefix position takes the sum of its
    ``size``-token chunk's scores, so whole chunks are kept; within a chunk earlier
    positions rank a hair higher, so a chunk cut by the budget keeps its start.
    -inf (never kept) stays -inf and adds nothing to its chunk."""
    rows, n = scores.shape
    if size <= 1 or n == 0:
        return scores
    keepable = scores > -mx.inf
    padded = mx.pad(mx.where(keepable, scores, 0.0), [(0, 0), (0, -n % size)])
    sums = mx.repeat(padded.reshape(rows, -1, size).sum(axis=-1), size, axis=1)[:, :n]
    return mx.where(keepable, sums - (mx.arange(n) % size) * _tie_step(sums), -mx.inf)


def spread(scores: mx.array, span: int) -> mx.array:
    """Each prefix position also takes the best score of the ``span`` positions before
    it, so the tokens that follow a chosen one (the rest of a number, a code, a name) are
    kept with it; nearer followers rank a hair higher, so a cut run keeps its start.
    -inf (never kept) stays -inf."""
    if span <= 0 or scores.shape[-1] == 0:
        return scores
    padded = mx.pad(scores, [(0, 0), (span, 0)], constant_values=-mx.inf)
    n, step = scores.shape[-1], _tie_step(scores)
    best = scores
    for back in range(1, span + 1):
        best = mx.maximum(best, padded[:, span - back : span - back + n] - back * step)
    return mx.where(scores > -mx.inf, best, -mx.inf)


def widen_to_words(scores: mx.array, words: mx.array, reach: int) -> mx.array:
    """Each prefix position also takes the best score of the positions of its own word
    (``words``: a word number per position) up to ``reach`` either side, so a word
    chosen is kept whole (a number, a code, a UUID); nearer positions rank a hair higher,
    so a word cut by the budget keeps what is nearest its best token. -inf stays -inf."""
    n = scores.shape[-1]
    if reach <= 0 or n == 0:
        return scores
    padded = mx.pad(scores, [(0, 0), (reach, reach)], constant_values=-mx.inf)
    padded_words = mx.pad(words, [(reach, reach)], constant_values=-1)
    step, best = _tie_step(scores), scores
    for distance in range(1, reach + 1):
        for shift in (-distance, distance):
            same = padded_words[reach + shift : reach + shift + n] == words
            best = mx.maximum(best, mx.where(same, padded[:, reach + shift : reach + shift + n] - distance * step,
                                             -mx.inf))
    return mx.where(scores > -mx.inf, best, -mx.inf)


def _tie_step(scores: mx.array) -> mx.array:
    """Per row, a step far below any real difference between scores (a millionth of the
    largest magnitude), to rank equal scores by position whatever their sign."""
    finite = mx.where(mx.abs(scores) < mx.inf, mx.abs(scores), 0.0)
    return mx.max(finite, axis=-1, keepdims=True) * 1e-6 + 1e-30


def key_novelty(keys: mx.array, window: int) -> mx.array:
    """KeyDiff's query-agnostic score of every prefix key: minus its cosine similarity
    to its KV head's mean key direction (the mean of all ``N`` unit keys), so the keys
    least like the rest score highest: ``[kv_heads, N - w]`` float32."""
    unit = _unit(keys.astype(mx.float32))
    anchor = _unit(unit.mean(axis=1, keepdims=True))
    return -(unit[:, : keys.shape[1] - window] * anchor).sum(axis=-1)


def _unit(x: mx.array) -> mx.array:
    return x / mx.maximum(mx.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


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


def keep_per_head(scores: mx.array, budget: int, window: int, floor: float = HEAD_FLOOR) -> mx.array:
    """AdaKV's indices: the layer's ``kv_heads x (budget - window)`` best prefix positions
    over all its KV heads together (each head's best ``floor`` share of an equal split
    first), plus the window. ``scores`` ``[kv_heads, N - w]`` (-inf: never kept); returns
    sorted ``[kv_heads, widest + window]`` int32, -1 where a head keeps fewer than the widest."""
    heads, prefix = scores.shape
    top = budget - window
    if top <= 0 or heads == 1:
        return keep_top(scores, budget, window)
    ranks = mx.argsort(mx.argsort(-scores, axis=-1), axis=-1)  # each position's rank within its head
    boosted = mx.where((ranks < math.ceil(top * floor)) & (scores > -mx.inf), mx.inf, scores).reshape(-1)
    best = mx.argpartition(-boosted, kth=heads * top - 1)[: heads * top]
    chosen = mx.zeros(heads * prefix, mx.bool_)
    chosen[best] = True
    chosen = chosen.reshape(heads, prefix) & (scores > -mx.inf)
    widest = chosen.sum(axis=1).max().item()
    positions = mx.arange(prefix)[None]
    picked = mx.sort(mx.where(chosen, positions, prefix + positions), axis=-1)[:, :widest]
    picked = mx.where(picked < prefix, picked, -1)
    recent = mx.broadcast_to(mx.arange(prefix, prefix + window), (heads, window))
    return mx.sort(mx.concatenate([picked, recent], axis=-1).astype(mx.int32), axis=-1)
