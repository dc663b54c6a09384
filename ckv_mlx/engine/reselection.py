"""Re-selection from the document's full cache on disk (a part of
:class:`~ckv_mlx.engine.session.Session`), and the session's side of the store: reuse a
stored document or read and store it (:func:`read_or_reuse`), and publish a longer prefix
(:func:`extended`). ``disk/`` knows stores and files; this module moves a session onto them."""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import mlx.core as mx
import numpy as np

from ..disk.disk_cache import DiskFullCache, stored_full_cache
from ..disk.store import CONVERSATIONS, DEFAULT_LIMIT_BYTES, StoreWriter
from .memory import disk_read_step, mib
from ..errors import CKVError
from ..kv.cache import EvictingKVCache
from ..kv.eviction import prompt_budgets
from ..kv.quantized import KVBits
from .reading import PREFILL_STEP


class Reselection:
    """Selecting from every row on disk, one layer at a time."""

    def reselect(self, tokens: list[int], full: DiskFullCache, avg_budget: int | None) -> mx.array:
        """Read ``tokens`` against every row of the full cache on disk and keep each
        layer's share of ``avg_budget``, one layer at a time: the caches and logits that
        :meth:`feed` then :meth:`compress` give with the full cache in memory, holding
        at most one layer's full rows. ``tokens`` join the full cache's rows."""
        every = self.model_budgets(avg_budget)
        total = full.tokens + len(tokens)
        if every is not None:
            every = prompt_budgets(every, total, avg_budget)
        budgets = None if every is None else self.placement.mine(every)
        start, kept = time.perf_counter(), []

        def keep(layer: int, keys: mx.array, values: mx.array):
            cache = EvictingKVCache.holding(keys, values, total, self.region)
            if budgets is not None:
                self._compress_layer(layer, budgets[layer], cache, self.kv_bits)
            mx.eval(cache.arrays())
            kept.append(cache)

        step = self._disk_step(total)
        split = (len(tokens) - 1) // step * step  # the last piece, of at most a step, selects
        body, last = tokens[:split], tokens[split:]
        with self.taken_back_on_failure(full):  # an interrupted selection adds none of its pieces
            self.read_on_disk(body, full)  # their rows join the full cache; the last piece's window selects
            self.note_read(last)  # before the call: each layer selects inside it, over every token
            logits = full.read(self.model, last, self.model_caches(full.streamed(self.attentions, keep)))
        mx.eval([a.window_state() for a in self.attentions])
        self.caches = kept
        self.stats.reselect_s = time.perf_counter() - start
        self._selected(every)
        return logits

    @contextmanager
    def taken_back_on_failure(self, full: DiskFullCache):
        """The rows the block adds to ``full``'s tail and the tokens it notes are taken
        back out if it fails."""
        read_before, noted = full.tail.tokens, None if self.tokens is None else len(self.tokens)
        try:
            yield
        except BaseException:
            full.tail.truncate(read_before)
            if noted is not None:
                del self.tokens[noted:]
            raise

    def read_on_disk(self, tokens: list[int], full: DiskFullCache):
        """Read ``tokens`` against every row of the full cache on disk, their rows joining
        it; nothing is kept in memory but the window queries. In as few pieces as memory
        allows (:meth:`_disk_step`): each piece reads every layer from disk."""
        step = self._disk_step(full.tokens + len(tokens))
        for start in range(0, len(tokens), step):
            full.read(self.model, tokens[start : start + step], self.model_caches(full.streamed(self.attentions)))
            self.note_read(tokens[start : start + step])

    def _disk_step(self, total: int) -> int:
        """Tokens per model call against ``total`` rows on disk (the query heads: the
        window queries' count, remembered with the document); a group takes its least."""
        heads = max((q.shape[1] for q in self.remembered_queries() if q is not None), default=0)
        return self.ranks.least(disk_read_step(heads, total, PREFILL_STEP) if heads else PREFILL_STEP)

    def forget_rows(self):
        """Free every row held (they are on disk), keeping the position, the window
        queries and what one row costs."""
        self.caches = [cache.emptied() for cache in self.caches]


def read_or_reuse(session, root: Path, key: str, name: str, read: Callable[[StoreWriter | None], None],
                  notify: Callable[[str], None], limit_bytes: int = DEFAULT_LIMIT_BYTES,
                  kv_bits: KVBits | None = None, tokens: list[int] | None = None) -> DiskFullCache | None:
    """The full cache on disk of the document ``name`` (of ``tokens``, if given: what
    selections need to know its words) for ``session``: the stored one when there is one
    (the session then stands at its end, nothing read), else what
    ``read(writer)`` reads into ``session``, stored as it goes (packed by ``kv_bits``,
    which ``key`` must hold: :func:`~ckv_mlx.disk.store.document_key`). When the disk refuses,
    ``read`` still runs (told why), without a store: None, the full cache in memory."""
    session.packable(kv_bits)
    full = stored_full_cache(root, key, notify, kv_bits)
    if not session.ranks.all(full is not None) and full is not None:  # a rank without its part: all read again
        full.close()
        full = None
    if full is not None:
        notify(f"{name} was read before: its stored cache ({mib(full.nbytes)} on disk) is used, nothing to read")
        session.take_over(full.empty_caches(session.region), full.store.queries(), full.store.others(), tokens)
        return full
    try:
        writer = StoreWriter(root, key, len(session.caches), kv_bits, limit_bytes)
    except CKVError as error:
        notify(f"{error}; the full cache stays in memory meanwhile")
        writer = None
    if not session.ranks.all(writer is not None) and writer is not None:  # the group reads one way
        writer.abort()
        writer = None
    try:
        read(writer)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    if writer is None:
        return None
    try:
        store = writer.publish(session.remembered_queries(), session.others)
    except CKVError as error:
        notify(f"{error}; the full cache stays in memory meanwhile")
        store = None
    if not session.ranks.all(store is not None):  # the group answers one way: from memory, stored for next time
        return None
    return DiskFullCache(store, root / CONVERSATIONS)


def extended(session, full: DiskFullCache, tokens: list[int], root: Path, key: str,
             limit_bytes: int = DEFAULT_LIMIT_BYTES) -> DiskFullCache:
    """``full``, where ``session`` stands, with ``tokens`` read after it, published as the
    store ``key`` (the rows copied, then the new ones; the root then pruned to
    ``limit_bytes``): a longer prefix for the next reader. ``session`` then stands at its
    end, as after :func:`read_or_reuse`."""
    session.forget_rows()
    session.read_on_disk(tokens, full)
    writer = StoreWriter(root, key, len(full.tail.shapes), full.store.kv_bits, limit_bytes)
    try:
        for layer in range(len(full.tail.shapes)):
            files = [f for pair in (full.store.files(layer), full.tail.files(layer)) for f in pair]
            keys, values = (np.concatenate([np.fromfile(f.path, np.uint8, f.nbytes) for f in files[i::2]]) for i in (0, 1))
            writer.restore_layer(layer, full.store.shape(layer), full.store.dtype, [keys, values])
        writer.advance(full.tokens)
        full.close()  # its rows are copied: its lease ends before the publish prunes
        store = writer.publish(session.remembered_queries(), session.others)
    except BaseException:
        writer.abort()
        raise
    finally:
        full.close()
    longer = DiskFullCache(store, root / CONVERSATIONS)
    session.take_over(longer.empty_caches(session.region), store.queries(), store.others())
    return longer
