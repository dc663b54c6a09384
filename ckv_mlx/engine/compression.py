"""Compression and eviction of a session's layers to their budgets (a part of
:class:`~ckv_mlx.engine.session.Session`); one layer's selection is
:func:`~ckv_mlx.kv.eviction.compress_layer`."""

from __future__ import annotations

import time

import mlx.core as mx

from ..kv.cache import EvictingKVCache
from ..kv.eviction import compress_layer, prompt_budgets
from ..kv.quantized import KVBits
from ..policy.budgets import check_budget
from ..policy.methods import Method


class Compression:
    """Budgets, compression, eviction."""

    def layer_budgets(self, avg_budget: int | None, method: Method | None = None) -> list[int] | None:
        """Each layer's share of ``avg_budget`` (tokens per layer, window included) under
        ``method`` (default: the session's), for the layers held here; None for a method
        that keeps everything. Refuses a budget that is too small."""
        every = self.model_budgets(avg_budget, method)
        return None if every is None else self.placement.mine(every)

    def model_budgets(self, avg_budget: int | None, method: Method | None = None) -> list[int] | None:
        """:meth:`layer_budgets` of every compressing layer of the whole model (the same on
        every rank of a group)."""
        method = method or self.method
        if not method.compresses:
            return None
        check_budget(avg_budget, method.window)
        return method.layer_budgets(avg_budget, self.placement.total_layers)

    def compress(self, avg_budget: int | None) -> list[int] | None:
        """Cut every layer to its share of ``avg_budget``. A prompt no longer than the
        budget is kept whole."""
        every = self.model_budgets(avg_budget)
        if every is None:
            self._selected(None)
            return None
        start = time.perf_counter()
        every = prompt_budgets(every, self.caches[0].length, avg_budget)
        budgets = self.placement.mine(every)
        for layer, budget in enumerate(budgets):
            self._compress_layer(layer, budget, kv_bits=self.kv_bits)
        self._eval_caches()
        self.stats.compress_s = time.perf_counter() - start
        self._selected(every)
        return budgets

    def _selected(self, budgets: list[int] | None):
        """Record what the selection just made kept, beside what a full cache of the
        prompt read so far allocates: the one definition of both figures (``budgets``:
        the whole model's)."""
        stats = self.stats
        stats.kv_bytes_full, stats.kv_bytes_kept, stats.kv_rows_kept = self.full_bytes, self.kv_bytes, self.kv_rows_bytes
        stats.layer_budgets = budgets

    def _evict_to(self, budgets: list[int]):
        """Cut every layer longer than its budget, one at a time (bounded transients)."""
        for layer, budget in enumerate(budgets):
            cache = self.caches[layer]
            if cache.length > budget:
                self._compress_layer(layer, budget)
                mx.eval(cache.arrays())

    def _compress_layer(self, layer: int, budget: int, cache: EvictingKVCache | None = None,
                        kv_bits: KVBits | None = None):
        """Re-score layer ``layer`` and keep ``budget`` rows (packed by ``kv_bits``, or
        as the layer was kept before)."""
        cache = cache or self.caches[layer]
        compress_layer(cache, self.method, self.placement.layers[layer], self.attentions[layer], budget, kv_bits,
                       self.words(cache), self.heads)

    def make_room(self, n: int):
        """Re-score and evict every compressed layer that cannot take ``n`` more rows."""
        for layer, cache in enumerate(self.caches):
            if cache.compressed and cache.free_slots() < n:
                self._compress_layer(layer, cache.budget)
