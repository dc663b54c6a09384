"""Compression methods: a scorer (which rows matter) plus a budget policy per layer.

Each method answers two questions and nothing else; the cache does the cutting.
``layer_budgets`` splits an average budget over layers; ``keep_indices`` picks the rows
of one layer to keep, ``[kv_heads or 1, budget]``, from its window queries and keys (with
per-head budgets, AdaKV's, ``[kv_heads, widest]``, -1 where a head keeps fewer).

A method's name may carry options after ``+``: ``snapkv+chunk20`` (whole chunks, as
ChunkKV), ``compresskv-gqa+span12`` (the tokens after a kept one kept with it),
``compresskv-gqa+window16+max+kernel9`` (its window, pooling and kernel).
"""

from __future__ import annotations

import re

import mlx.core as mx

from . import budgets
from ..errors import CKVError
from ..profiles import Defaults
from .heads import HeadSlice
from .scoring import chunked, group_mean, head_scores, keep_per_head, keep_top, key_novelty, spread, widen_to_words


class Method:
    """Base: uniform budgets, window scoring over ``heads(layer)``, shared selection."""

    name = ""
    compresses = True
    per_head_budgets = False  # AdaKV: the layer's budget shared out over its KV heads by score
    chunk = 1  # tokens kept together: each position scores its chunk's sum (ChunkKV)
    span = 0  # each position also scores as well as the best of the span before it
    word = 0  # each position also scores as well as the best of its word, this far either side (needs the tokens)

    def __init__(
        self, window: int = Defaults.window, kernel: int = Defaults.kernel, pooling: str = Defaults.pooling
    ):
        self.window, self.kernel, self.pooling = window, kernel, pooling

    def layer_budgets(self, avg_budget: int, n_layers: int) -> list[int]:
        return budgets.uniform(n_layers, avg_budget)

    def keep_indices(
        self, layer: int, window_queries: mx.array, keys: mx.array, scale: float, budget: int,
        sinks: mx.array | None = None, visible: mx.array | None = None, words: mx.array | None = None,
        heads: HeadSlice | None = None,
    ) -> mx.array:
        """Rows of ``keys`` (``[kv_heads, N, d]``) to keep, sorted; all when N <= budget.
        ``sinks``: the layer's learned attention-sink logit per query head, if it has them;
        ``visible``: ``[kv_heads, N]``, False on padding rows, which are never kept;
        ``words``: ``[N]``, each row's word number (rows in position order), for ``word``;
        ``heads``: the slice of the layer's heads held here (None: all of them).
        ``layer`` is the layer's number among the whole model's compressing layers."""
        n = keys.shape[1]
        if n <= budget:
            return mx.arange(n)[None]
        scores = chunked(self.scores(layer, window_queries, keys, scale, sinks, visible, heads), self.chunk)
        if self.word and words is not None:
            scores = widen_to_words(scores, words[: scores.shape[-1]], self.word)
        scores = spread(scores, self.span)
        if visible is not None:
            prefix = visible[:, : n - self.window]
            scores = mx.where(prefix if scores.shape[0] > 1 else prefix.any(axis=0, keepdims=True), scores, -mx.inf)
        if not self.per_head_budgets:
            return keep_top(scores, budget, self.window)
        if heads is None:
            return keep_per_head(scores, budget, self.window)
        mine = heads.kv_rows(scores.shape[0])  # the layer's budget is shared over every rank's KV heads
        every = heads.gather(scores, mine, heads.total_kv, scores.shape[1])
        return keep_per_head(every, budget, self.window)[mine[0] : mine[-1] + 1]

    def scores(self, layer: int, window_queries, keys, scale, sinks=None, visible=None, heads=None) -> mx.array:
        raise NotImplementedError

    def head_rows(self, wanted: list[int], window_queries, keys, scale, sinks, visible, heads) -> mx.array:
        """:func:`head_scores` of the query heads ``wanted`` (the layer's numbers), one row
        each, in order, every rank scoring the heads it holds."""
        score = lambda chosen: head_scores(window_queries, keys, chosen, scale, self.kernel, self.pooling, sinks,
                                           visible)
        if heads is None:
            return score(wanted)
        held = heads.held(wanted, window_queries.shape[0])
        mine = score([wanted[i] - heads.first_query for i in held]) if held else None
        return heads.gather(mine, held, len(wanted), keys.shape[1] - window_queries.shape[1])


class FullCache(Method):
    """No compression: the reference every method is measured against."""

    name = "full"
    compresses = False


class StreamingLLM(Method):
    """Attention sinks plus the most recent tokens; ignores the queries."""

    name = "streamingllm"

    def __init__(self, sinks: int = 4, **kwargs):
        super().__init__(**kwargs)
        self.sinks = sinks

    def keep_indices(self, layer, window_queries, keys, scale, budget, sinks=None, visible=None, words=None,
                     heads=None):
        n = keys.shape[1]
        if n <= budget:
            return mx.arange(n)[None]
        sinks = min(self.sinks, budget)
        rows = mx.concatenate([mx.arange(sinks), mx.arange(n - (budget - sinks), n)])
        return rows[None].astype(mx.int32)


class SnapKV(Method):
    """All query heads, averaged within each GQA group: one token set per KV head."""

    name = "snapkv"

    def scores(self, layer, window_queries, keys, scale, sinks=None, visible=None, heads=None):
        mine = list(range(window_queries.shape[0]))  # each KV head's own group: held with it
        per_head = head_scores(window_queries, keys, mine, scale, self.kernel, self.pooling, sinks, visible)
        kv_heads = keys.shape[0]
        return group_mean(per_head, mine, len(mine) // kv_heads, kv_heads)


class AdaSnapKV(SnapKV):
    """SnapKV scoring, the layer's budget shared out over its KV heads by score mass
    (AdaKV, arXiv 2407.11550)."""

    name = "snapkv-ada"
    per_head_budgets = True


class PyramidKV(SnapKV):
    """SnapKV scoring with budgets decreasing linearly from the first layer to the last."""

    name = "pyramidkv"

    def layer_budgets(self, avg_budget, n_layers):
        return budgets.pyramid(n_layers, avg_budget, window=self.window)


class KeyDiff(Method):
    """Query-agnostic (KeyDiff, arXiv 2504.15364): each KV head keeps the keys least like
    its others, whatever was asked; the window's rows stay, as for every method."""

    name = "keydiff"

    def scores(self, layer, window_queries, keys, scale, sinks=None, visible=None, heads=None):
        return key_novelty(keys, self.window)


class CompressKV(Method):
    """The paper: mean over the layer's Semantic Retrieval Heads, one token set per layer,
    error-aware layer budgets."""

    name = "compresskv"

    def __init__(self, profile, **kwargs):
        super().__init__(**kwargs)
        self.profile = profile

    def layer_budgets(self, avg_budget, n_layers):
        if self.profile.layer_errors is None:
            return budgets.uniform(n_layers, avg_budget)
        return budgets.error_aware(self.profile.layer_errors, avg_budget)

    def scores(self, layer, window_queries, keys, scale, sinks=None, visible=None, heads=None):
        srh = self.profile.srh_heads(layer)
        return self.head_rows(srh, window_queries, keys, scale, sinks, visible, heads).mean(axis=0, keepdims=True)


class CompressKVGQA(CompressKV):
    """Ours: each KV head selects with the SRHs of its own GQA group (the layer's SRH
    mean when its group has none), so every KV head keeps its own token set."""

    name = "compresskv-gqa"

    def scores(self, layer, window_queries, keys, scale, sinks=None, visible=None, heads=None):
        srh = self.profile.srh_heads(layer)
        kv_heads = keys.shape[0]
        group = window_queries.shape[0] // kv_heads
        if heads is None:
            return group_mean(self.head_rows(srh, window_queries, keys, scale, sinks, visible, None), srh, group,
                              kv_heads)
        every_kv = range(heads.total_kv)
        if all(any(h // group == kv for h in srh) for kv in every_kv):  # each KV head's SRHs held with it
            held = [srh[i] - heads.first_query for i in heads.held(srh, window_queries.shape[0])]
            return group_mean(self.head_rows(held, window_queries, keys, scale, sinks, visible, None), held, group,
                              kv_heads)
        every = group_mean(self.head_rows(srh, window_queries, keys, scale, sinks, visible, heads), srh, group,
                           heads.total_kv)  # a group without SRHs takes the mean of all of them
        mine = heads.kv_rows(kv_heads)
        return every[mine[0] : mine[-1] + 1]


class AdaCompressKVGQA(CompressKVGQA):
    """``compresskv-gqa`` scoring and error-aware layer budgets, each layer's budget
    shared out over its KV heads by their SRHs' score mass (AdaKV)."""

    name = "compresskv-gqa-ada"
    per_head_budgets = True


METHODS = {m.name: m for m in (FullCache, CompressKV, CompressKVGQA, AdaCompressKVGQA, SnapKV, AdaSnapKV, PyramidKV,
                               StreamingLLM, KeyDiff)}
PROFILED = (CompressKV.name, CompressKVGQA.name, AdaCompressKVGQA.name)


OPTION = re.compile(r"(chunk|span|word|window|kernel)([1-9][0-9]*)|(avg|max)")
OPTIONS_HELP = ("chunkN (whole N-token chunks), spanN (the N tokens after a kept one), wordN (a kept token's word, "
                "up to N tokens either side), windowN, kernelN (odd), avg or max (pooling)")


def options(name: str) -> tuple[str, dict]:
    """``name``'s base method and its ``+`` options as attributes to set; an unknown
    method or option, or one that does not apply, is refused in one line."""
    base, *parts = name.split("+")
    if base not in METHODS:
        raise CKVError(f"unknown method {base!r}: choose one of {', '.join(METHODS)}")
    if parts and base in (FullCache.name, StreamingLLM.name):
        raise CKVError(f"method {name!r}: {base} scores nothing, so it takes no options; drop them")
    settings = {}
    for part in parts:
        match = OPTION.fullmatch(part)
        if match is None:
            raise CKVError(f"method {name!r}: unknown option {part!r}; options are {OPTIONS_HELP}")
        attribute, value = (match[1], int(match[2])) if match[1] else ("pooling", match[3])
        if attribute == "kernel" and value % 2 == 0:
            raise CKVError(f"method {name!r}: the pooling kernel must be odd, got {value}")
        if attribute in ("kernel", "pooling") and base == KeyDiff.name:
            raise CKVError(f"method {name!r}: keydiff pools nothing, so kernelN, avg and max do not apply; drop them")
        if attribute in settings:
            raise CKVError(f"method {name!r}: {attribute} is given twice; keep one")
        settings[attribute] = value
    return base, settings


def _named(base: str, settings: dict) -> str:
    """The one name of ``base`` with ``settings``, options in a fixed order."""
    order = ("chunk", "span", "word", "window", "kernel", "pooling")
    return base + "".join(f"+{settings[a]}" if a == "pooling" else f"+{a}{settings[a]}" for a in order if a in settings)


def compresses(name: str) -> bool:
    return METHODS[options(name)[0]].compresses


METHOD_HELP = f"one of {', '.join(METHODS)}, with options after '+' ({OPTIONS_HELP})"


def make_method(name: str, profile=None) -> tuple[Method, list[str]]:
    """The method called ``name`` (with its ``+`` options), configured from ``profile``;
    plus notes for the user.

    A profiled method without a profile falls back to SnapKV scoring and says so.
    """
    base, settings = options(name)
    if base not in PROFILED:
        method, notes = METHODS[base](), []
    elif profile is None:
        note = (
            f"no SRH profile for this model: {base} falls back to SnapKV scoring "
            "(make one with `python -m ckv_mlx.profile`, or pass --profile)"
        )
        method, notes = (AdaSnapKV() if METHODS[base].per_head_budgets else SnapKV()), [note]
    else:
        d = profile.defaults
        method = METHODS[base](profile, window=d.window, kernel=d.kernel, pooling=d.pooling)
        notes = [] if profile.layer_errors else [f"profile has no layer errors: {base} uses uniform budgets"]
    for attribute, value in settings.items():
        setattr(method, attribute, value)
    if settings:
        method.name = _named(method.name, settings)  # of the method that runs (SnapKV where it fell back)
    return method, notes
