"""Reading a prompt into a session: whole, or in bounded chunks that compress as they go,
into the document store too when given (a part of
:class:`~ckv_mlx.engine.session.Session`)."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable

import mlx.core as mx

from ..disk.store import STORED_QUERIES, StoreWriter
from ..errors import CKVError
from ..kv.cache import EvictingKVCache
from ..kv.layer_caches import arrays, copies

PREFILL_STEP = 512  # tokens per model call while reading


class Reading:
    """Prefill and feed."""

    def prefill(
        self,
        tokens: list[int],
        progress: Callable[[int, int], None] | None = None,
        working_budget: int | None = None,
        chunk: int = PREFILL_STEP,
        question: list[int] | None = None,
        store: StoreWriter | None = None,
    ) -> mx.array:
        """Run the whole prompt; return the last token's logits.

        By default the full cache is kept. With ``working_budget`` (tokens per layer on
        average) the prompt is read in ``chunk``-token pieces that compress as they go:
        after each one, every layer evicts back to its share of the working budget, so
        no layer ever holds more than its share plus one chunk. Each piece is scored by
        its own last tokens, or, given the ``question`` that will follow the prompt, by
        the question read right after the piece (see :meth:`_read_piece`).

        With ``store``, every layer's rows are also written to it as they are computed,
        before any eviction: the whole document, even one read in bounded memory.
        """
        mx.reset_peak_memory()
        start = time.perf_counter()
        self._recorder = store
        if store is not None:  # the store's window queries must serve any method later
            for attention in self.attentions:
                attention.keep(STORED_QUERIES)
        try:
            if working_budget is None:
                logits = self.feed(tokens, progress, chunk)
            else:
                logits = self._feed_bounded(tokens, working_budget, chunk, progress, question)
        finally:
            self._recorder = None
        mx.eval(logits, [a.window_state() for a in self.attentions])
        self.stats.prefill_s = time.perf_counter() - start
        self.stats.prompt_tokens = len(tokens)
        self.stats.kv_bytes_full = self.full_bytes  # until a selection (``_selected``) records the prompt's
        self.stats.peak_kv_bytes = max(self.stats.peak_kv_bytes, self.kv_bytes)
        self.stats.working_budget = working_budget
        return logits

    def _feed_bounded(self, tokens, working_budget, chunk, progress, question) -> mx.array:
        budgets = self.layer_budgets(working_budget)
        half = chunk // 2
        probe = question[-half:] if question and half else []
        body, last = tokens[:-1], tokens[-1:]
        step = chunk - len(probe)
        with self._chunk_sized_caches(chunk):
            for start in range(0, len(body), step):
                self._read_piece(body[start : start + step], probe)
                self._evict_to(budgets)
                if progress:
                    progress(min(start + step, len(body)), len(tokens))
        logits = self.model(mx.array([last]), cache=self.model_caches())[:, -1, :]
        self.note_read(last)
        self._record(1)
        if progress:
            progress(len(tokens), len(tokens))
        return logits

    @contextmanager
    def _chunk_sized_caches(self, chunk: int):
        """Room for exactly one chunk (piece and question) beside each layer's working
        budget, never more, and no rounding up before a layer's first eviction; the
        caches' own region and growth step come back however the block ends."""
        for cache in self.caches:
            cache.region_setting, cache.step = chunk, 1
        try:
            yield
        finally:
            for cache in self.caches:
                cache.region_setting, cache.step = self.region, EvictingKVCache.step

    def _read_piece(self, piece: list[int], probe: list[int]):
        """Append ``piece``, then read ``probe`` (the question, at most half a chunk) so
        that its queries become every layer's window, and drop the probe's rows: the
        next eviction keeps what the question attends to, as if it were asked here."""
        self.model(mx.array([piece]), cache=self.model_caches())
        self.note_read(piece)
        self._record(len(piece))
        before = copies(self.others) if probe else None  # mlx-lm may not trim them
        if probe:
            self.model(mx.array([probe]), cache=self.model_caches())
        self._eval_caches()
        self.stats.peak_kv_bytes = max(self.stats.peak_kv_bytes, self.kv_bytes)
        for cache in self.caches:
            cache.trim(len(probe))
        if before is not None:
            self.others = before

    def _record(self, rows: int):
        """While a prefill records, write every layer's latest ``rows`` rows to the store."""
        if self._recorder is not None:
            self._eval_caches()
            self._recorder.append(self.caches, rows)

    def _eval_caches(self):
        """Materialise every layer's keys, values and window queries, so no lazy graph
        keeps a replaced (e.g. full, pre-compression) buffer or a chunk's queries alive."""
        mx.eval([c.arrays() for c in self.caches], [a.window_state() for a in self.attentions],
                [arrays(c) for c in self.others.values()])

    def feed(
        self, tokens: list[int], progress: Callable[[int, int], None] | None = None, chunk: int = PREFILL_STEP
    ) -> mx.array:
        """Append tokens to the cache in ``chunk``-token pieces; return the logits of the
        last one.

        Once compressed, pieces are at most the smallest layer region and each layer
        evicts back to its budget before a piece would overflow it.
        """
        if not tokens:
            raise CKVError("nothing to process: the prompt is empty")
        step = self._step(chunk)
        body, last = tokens[:-1], tokens[-1:]
        for start in range(0, len(body), step):
            piece = body[start : start + step]
            self.make_room(len(piece))
            self.model(mx.array([piece]), cache=self.model_caches())
            self.note_read(piece)
            self._eval_caches()
            self._record(len(piece))
            if progress:
                progress(start + len(piece), len(tokens))
        self.make_room(1)
        logits = self.model(mx.array([last]), cache=self.model_caches())[:, -1, :]
        self.note_read(last)
        self._record(1)
        if progress:
            progress(len(tokens), len(tokens))
        return logits

    def _step(self, chunk: int) -> int:
        """Tokens per model call: ``chunk``, or at most the smallest region once compressed."""
        return min(chunk, *(c.region for c in self.caches)) if self.compressed else chunk
