"""Plain-NumPy reference of CompressKV token selection and its baselines.

Independent of ckv_mlx (no MLX import): written from docs/compresskv-method.md
(sections 2 and 4) and checked line by line against the paper's PyTorch code,
github.com/TUDa-HWAI/CompressKV at commit e8af510:

* methods/compresskv/snapkv_utils.py   compresskvCluster.update_kv, lines 46-84
* methods/snapkv/snapkv_utils.py       SnapKVCluster.update_kv, lines 47-85
* methods/pyramidkv/snapkv_utils.py    PyradmidKVCluster.update_kv, lines 59-116
* methods/streamingllm/snapkv_utils.py StreamingLLMKVCluster.update_kv, lines 49-67

All arrays are for ONE layer with no batch dimension; queries and keys are
post-RoPE (the reference calls update_kv right after apply_rotary_pos_emb,
methods/*/llama_hijack.py line 80). Everything is computed in float64.

Differences between the reference code and this file (the method doc wins):

* Precision. The reference runs in float16 (longbench/pred_compresskv.py line
  130): logits are an fp16 matmul, softmax is computed in fp32 but cast back to
  fp16 (`.to(query_states.dtype)`, compresskv line 65), and the row sum,
  pooling, head mean and topk all run in fp16. Here everything is float64.
* Causal mask. The reference adds torch.finfo(fp16).min to the window block
  (line 59-64); here masked logits are -inf. Same probabilities.
* Keep-all rule. The reference keeps everything when T < b (line 53); at
  T == b its topk(b - w) of the T - w prefix also keeps everything, so
  "T <= b keeps all" here is the same result.
* Order and ties. The reference concatenates torch.topk indices (descending
  score, unsorted; tie order unspecified on CUDA, and fp16 makes ties common)
  with the window. Here indices are returned ascending, and among equal
  scores the lower position wins (stable sort).
* SnapKV / PyramidKV grouping. The reference does
  reshape(bsz, G, Hkv, T - w).mean(1) (snapkv line 75-76, pyramidkv line
  105-106), which averages query heads {j, j+Hkv, j+2Hkv, ...}; transformers'
  repeat_kv maps query head h to KV head h // G, so the correct group of KV
  head j is {G*j .. G*j+G-1}. This file uses the correct grouping.
* StreamingLLM. The reference keeps the first b - w and the last w positions
  (streamingllm line 59-66), not 4 sinks + recent tokens. `sinks` selects
  either: sinks=4 (classic StreamingLLM), sinks=b-w (the reference variant).
* CompressKV per-GQA-group selection (select_compresskv_gqa) is not in the
  reference, which keeps one token set for all KV heads of a layer.
* PyramidKV budgets: see pyramid_budgets.
"""

from __future__ import annotations

import math

import numpy as np


def window_probs(q_win, k, heads, group_size, scale=None, sinks=None):
    """Causal softmax of the window queries of `heads` over all T keys.

    q_win [Hq, w, d] holds the queries of the last w prompt tokens, k [Hkv, T, d].
    Query head h reads KV head h // group_size. Window row r may see key
    column T - w + c only for c <= r. `sinks` [Hq]: a learned logit per query
    head that joins every row's softmax as one more column, then is dropped (as
    gpt-oss attends). Returns float64 [len(heads), w, T].
    """
    heads = np.asarray(heads, dtype=np.int64)
    q = np.asarray(q_win, dtype=np.float64)[heads]
    keys = np.asarray(k, dtype=np.float64)[heads // group_size]
    w, T = q.shape[1], keys.shape[1]
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    logits = np.einsum("hrd,htd->hrt", q, keys) * scale
    row = np.arange(w)[:, None]
    col = np.arange(T)[None, :]
    logits = np.where(col > T - w + row, -np.inf, logits)
    if sinks is not None:
        sink = np.broadcast_to(np.asarray(sinks, dtype=np.float64)[heads][:, None, None], (len(heads), w, 1))
        logits = np.concatenate([logits, sink], axis=-1)
    logits -= logits.max(axis=-1, keepdims=True)
    weights = np.exp(logits)
    return (weights / weights.sum(axis=-1, keepdims=True))[..., :T]


def pooled_scores(probs, window, kernel=5, pooling="avg"):
    """Sum window rows, keep the T - w prefix columns, pool along positions.

    avg: zero padding of kernel // 2 each side, always divided by `kernel`
    (torch avg_pool1d with count_include_pad=True). max: -inf padding
    (torch max_pool1d). Returns [n_heads, T - w].
    """
    T = probs.shape[-1]
    summed = probs.sum(axis=-2)[:, : T - window]
    pad = kernel // 2
    fill = {"avg": 0.0, "max": -np.inf}[pooling]
    padded = np.pad(summed, ((0, 0), (pad, pad)), constant_values=fill)
    windows = np.lib.stride_tricks.sliding_window_view(padded, kernel, axis=-1)
    if pooling == "avg":
        return windows.sum(axis=-1) / kernel
    return windows.max(axis=-1)


def top_positions(scores, count):
    """Indices of the `count` largest scores, ascending; ties: lower index wins."""
    order = np.argsort(-scores, kind="stable")
    return np.sort(order[:count])


def _keep(prefix_positions, T, window):
    """Chosen prefix positions plus the last `window` positions, ascending."""
    return np.sort(np.concatenate([prefix_positions, np.arange(T - window, T)]))


def _head_scores(q_win, k, heads, window, kernel, pooling):
    """Pooled scores [len(heads), T - w] of the given query heads."""
    if q_win.shape[1] < window:
        raise ValueError(f"need the last {window} queries, got {q_win.shape[1]}")
    group_size = q_win.shape[0] // k.shape[0]
    probs = window_probs(q_win[:, -window:], k, heads, group_size)
    return pooled_scores(probs, window, kernel, pooling)


def select_compresskv(q_win, k, srh_heads, budget, window=8, kernel=5, pooling="avg"):
    """Positions CompressKV keeps for a layer: one set for all KV heads, [budget]."""
    T = k.shape[1]
    if T <= budget:
        return np.arange(T)
    scores = _head_scores(q_win, k, srh_heads, window, kernel, pooling).mean(axis=0)
    return _keep(top_positions(scores, budget - window), T, window)


def select_snapkv(q_win, k, budget, window=8, kernel=5, pooling="avg"):
    """SnapKV with correct GQA grouping: positions per KV head, [Hkv, budget]."""
    n_kv, T = k.shape[0], k.shape[1]
    if T <= budget:
        return np.tile(np.arange(T), (n_kv, 1))
    grouped = snapkv_grouped(q_win, k, window, kernel, pooling)
    return np.stack([_keep(top_positions(s, budget - window), T, window) for s in grouped])


def select_compresskv_gqa(q_win, k, srh_heads, budget, window=8, kernel=5, pooling="avg"):
    """CompressKV per KV head: mean over the SRHs of its own GQA group.

    A KV head whose group holds no SRH uses the mean over all the layer's SRHs.
    Returns [Hkv, budget].
    """
    n_kv, T = k.shape[0], k.shape[1]
    if T <= budget:
        return np.tile(np.arange(T), (n_kv, 1))
    srh_heads = np.asarray(srh_heads, dtype=np.int64)
    group_size = q_win.shape[0] // n_kv
    scores = _head_scores(q_win, k, srh_heads, window, kernel, pooling)
    rows = []
    for kv_head in range(n_kv):
        mine = srh_heads // group_size == kv_head
        head_scores = scores[mine] if mine.any() else scores
        rows.append(_keep(top_positions(head_scores.mean(axis=0), budget - window), T, window))
    return np.stack(rows)


def select_adakv(grouped, budget, window=8, floor=0.2):
    """AdaKV over per-KV-head scores ``grouped`` ([Hkv, T - w]): each head's best
    ceil(floor x (budget - w)) positions, then the best of the rest over all heads until
    Hkv x (budget - w) are chosen; plus the window. Rows padded with -1 at the front to
    the widest head: [Hkv, widest + w]."""
    n_kv, prefix = grouped.shape
    top = budget - window
    guaranteed = int(np.ceil(top * floor))
    chosen = np.zeros_like(grouped, dtype=bool)
    for head in range(n_kv):
        chosen[head, np.argsort(-grouped[head])[:guaranteed]] = True
    rest = np.where(chosen, -np.inf, grouped).ravel()
    chosen.ravel()[np.argsort(-rest)[: n_kv * top - chosen.sum()]] = True
    widest = chosen.sum(axis=1).max()
    rows = []
    for head in range(n_kv):
        kept = _keep(np.flatnonzero(chosen[head]), prefix + window, window)
        rows.append(np.concatenate([np.full(widest + window - len(kept), -1), kept]))
    return np.stack(rows)


def snapkv_grouped(q_win, k, window=8, kernel=5, pooling="avg"):
    """SnapKV's per-KV-head scores [Hkv, T - w]: every query head, averaged per group."""
    n_kv, T = k.shape[0], k.shape[1]
    scores = _head_scores(q_win, k, np.arange(q_win.shape[0]), window, kernel, pooling)
    return scores.reshape(n_kv, -1, T - window).mean(axis=1)


def select_keydiff(k, budget, window=8):
    """KeyDiff per KV head: the prefix keys least cosine-similar to the head's mean unit
    key (over all T keys), plus the window, [Hkv, budget]."""
    n_kv, T = k.shape[0], k.shape[1]
    if T <= budget:
        return np.tile(np.arange(T), (n_kv, 1))
    k = np.asarray(k, dtype=np.float64)
    unit = k / np.linalg.norm(k, axis=-1, keepdims=True)
    rows = []
    for head in unit:
        anchor = head.mean(axis=0)
        cosine = head[: T - window] @ (anchor / np.linalg.norm(anchor))
        rows.append(_keep(top_positions(-cosine, budget - window), T, window))
    return np.stack(rows)


def select_streamingllm(T, budget, sinks=4):
    """First `sinks` positions plus the last budget - sinks, ascending [budget]."""
    if T <= budget:
        return np.arange(T)
    return np.concatenate([np.arange(sinks), np.arange(T - (budget - sinks), T)])


def pyramid_budgets(n_layers, avg_budget, window=8, beta=20, prompt_len=None):
    """PyramidKV per-layer budgets (window included), as the reference computes them.

    Follows methods/pyramidkv/snapkv_utils.py lines 67-82 (identical to
    KVCache-Factory's pyramidkv_utils.py): integer floor divisions, and when
    max_num >= prompt_len - window, max_num is cut to prompt_len - window and
    min_num raised to keep the mean. Unlike the doc's "(B-w)/beta", min is
    floored, and the step is floored too, so sum(budgets) is generally NOT
    n_layers * avg_budget (e.g. L=32, B=128: 4272, not 4096). In the reference
    each layer computes this once, on its first prefill, and kv_cluster is
    never reset between samples (longbench/pred_compresskv.py), so the
    budgets depend on the first prompt's length; prompt_len=None means no cut.
    """
    base = avg_budget - window
    min_num = base // beta
    max_num = base * 2 - min_num
    if prompt_len is not None and max_num >= prompt_len - window:
        max_num = prompt_len - window
        min_num = base * 2 - max_num
    steps = (max_num - min_num) // (n_layers - 1)
    return [max_num - layer * steps + window for layer in range(n_layers)]


def select_chunked(scores, budget, window, chunk):
    """ChunkKV (arXiv 2502.00299) over one row of prefix scores: chunks of `chunk`
    positions ranked by their sum (ties: lower index wins), taken whole in that order; the
    chunk the budget cuts keeps its first positions; plus the window, ascending."""
    T = len(scores) + window
    starts = range(0, len(scores), chunk)
    sums = np.array([scores[s : s + chunk].sum() for s in starts])
    order = np.argsort(-sums, kind="stable")
    taken = np.concatenate([np.arange(s * chunk, min((s + 1) * chunk, len(scores))) for s in order])
    return _keep(taken[: budget - window], T, window)


def select_spread(scores, budget, window, span):
    """The kept positions when each prefix position scores as the best of itself and the
    `span` positions before it, nearer ones first on ties; plus the window, ascending."""
    n = len(scores)
    ranked = []
    for p in range(n):
        back = max(range(max(0, p - span), p + 1), key=lambda q: (scores[q], q))
        ranked.append((-scores[back], p - back, p))
    chosen = [p for _, _, p in sorted(ranked)[: budget - window]]
    return _keep(np.array(chosen, dtype=np.int64), n + window, window)


def select_word(scores, budget, window, words, reach):
    """The kept positions when each prefix position scores as the best position of its
    own word (`words`: a word number per position) at most `reach` away, nearer ones first
    on ties; plus the window, ascending."""
    n = len(scores)
    ranked = []
    for p in range(n):
        near = [q for q in range(max(0, p - reach), min(n, p + reach + 1)) if words[q] == words[p]]
        best = max(near, key=lambda q: (scores[q], -abs(p - q)))
        ranked.append((-scores[best], abs(p - best), p))
    chosen = [p for _, _, p in sorted(ranked)[: budget - window]]
    return _keep(np.array(chosen, dtype=np.int64), n + window, window)
