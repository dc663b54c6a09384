"""Compression and eviction of one layer: the method picks rows from the layer's window
queries, the cache keeps them. The one place both happen, for the engine and for the
caches mlx-lm drives (``prompt_cache.py``)."""

from __future__ import annotations

import mlx.core as mx

from .attention import LayerWindow
from .cache import EvictingKVCache
from ..policy.heads import HeadSlice
from ..policy.methods import Method
from .quantized import KVBits


def compress_layer(cache: EvictingKVCache, method: Method, layer: int, window: LayerWindow, budget: int,
                   kv_bits: KVBits | None = None, words: mx.array | None = None, heads: HeadSlice | None = None):
    """Score ``cache``'s rows with ``window``'s queries under ``method`` (as layer
    ``layer``, its number among the whole model's compressing layers) and keep ``budget``
    of them (packed by ``kv_bits``, or as they were kept before); ``words``: each row's
    word number, when the rows are the tokens in order; ``heads``: the slice of the
    layer's heads held here (None: all)."""
    keys = cache.keys_and_values()[0][0]
    keep = method.keep_indices(layer, window.window_queries, keys, window.scale, budget, window.sinks,
                               cache.visible_rows(), words, heads)
    cache.compress(keep, budget, kv_bits)


def prompt_budgets(budgets: list[int], length: int, avg_budget: int) -> list[int]:
    """The layer ``budgets`` for a prompt of ``length`` rows: a prompt no longer than the
    average budget is kept whole."""
    return [max(b, length) for b in budgets] if length <= avg_budget else budgets
