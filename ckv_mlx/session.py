"""The engine: prefill -> compress -> generate over one model, with exact statistics.

Every caller (CLI, app, profiler, evaluation, benchmark) drives this one class. All MLX
work of a session must happen on one thread.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Callable, Iterator, NamedTuple

import mlx.core as mx
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from .attention import observe
from .budgets import check_budget
from .cache import EvictingKVCache, allocated_rows
from .disk_cache import DiskFullCache
from .errors import CKVError
from .eviction import compress_layer, prompt_budgets
from .families import attention_modules
from .layer_caches import all_trimmable, arrays, copies, fresh_others, nbytes
from .methods import Method
from .quantized import KVBits, for_heads
from .store import STORED_QUERIES, StoreWriter

PREFILL_STEP = 512


@dataclass
class Stats:
    """What one prefill, compression and generation cost and kept."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    kv_bytes_full: int = 0  # allocated by a full cache of the prompt (as read when it was selected)
    kv_bytes_kept: int = 0  # allocated right after compression
    kv_rows_kept: int = 0  # of which rows holding tokens
    layer_budgets: list[int] | None = None
    prefill_s: float = 0.0
    compress_s: float = 0.0
    decode_s: float = 0.0
    peak_memory_bytes: int = 0
    peak_kv_bytes: int = 0
    working_budget: int | None = None
    reselect_s: float = 0.0  # the last re-selection from the full cache on disk
    disk_bytes: int = 0  # the full cache on disk, when it is there
    store_reused: bool = False  # the document's stored cache was used: nothing read

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tps(self) -> float:
        return self.generated_tokens / self.decode_s if self.decode_s else 0.0


class Snapshot(NamedTuple):
    """Everything a session holds of what it read (see :meth:`Session.snapshot`)."""

    caches: list[EvictingKVCache]
    queries: list[tuple]  # each layer's window state
    stats: Stats
    others: dict  # copies of mlx-lm's own caches, by layer


class Session:
    """A model with evicting caches and one compression method."""

    def __init__(self, model, tokenizer, method: Method, region: int | None = None, kv_bits: KVBits | None = None):
        self.model, self.tokenizer, self._method = model, tokenizer, method
        self.region = region
        self.attentions = observe(attention_modules(model), method.window)
        self._recorder = None
        self.reset()
        mx.eval(model(mx.array([[0]]), cache=self.model_caches()))  # each window sees how its layer attends
        self._head_dims = {c.keys.shape[-1] for c in self.caches if c.keys is not None}
        self.reset()
        self.kv_bits = kv_bits

    @property
    def kv_bits(self) -> KVBits | None:
        """How the rows each compression keeps are stored (None: as computed)."""
        return self._kv_bits

    @kv_bits.setter
    def kv_bits(self, kv_bits: KVBits | None):
        self._kv_bits = self.packable(kv_bits)

    def packable(self, kv_bits: KVBits | None) -> KVBits | None:
        """``kv_bits`` for this model's head sizes, refused in one line before anything
        is read where asked for and no group divides them (kept rows, or a store's);
        the default falls back to as computed there."""
        return for_heads(kv_bits, self._head_dims)

    @property
    def caches(self) -> list[EvictingKVCache]:
        """The caches of the layers that compress, in the model's order."""
        return self._caches

    def model_caches(self, caches: list | None = None) -> list:
        """What the model reads through: ``caches`` (default :attr:`caches`) at the layers
        that compress, mlx-lm's own caches (:attr:`others`) at the rest."""
        caches = iter(self.caches if caches is None else caches)
        return [self.others[i] if i in self.others else next(caches) for i in range(len(self.caches) + len(self.others))]

    @caches.setter
    def caches(self, caches: list[EvictingKVCache]):
        """Take ``caches`` as the model's: each one shows its layer's window the queries."""
        for cache, window in zip(caches, self.attentions):
            cache.window = window
        self._caches = caches

    @property
    def method(self) -> Method:
        return self._method

    @method.setter
    def method(self, method: Method):
        """Swap the method; the attention's observation window follows it (see
        :meth:`_use_window`)."""
        self._use_window(method)
        self._method = method

    @property
    def window(self) -> int:
        """The observation window: how many latest queries score each layer."""
        return self.attentions[0].window

    def _use_window(self, method: Method):
        """Score with ``method``'s window from now on. One wider than the queries
        remembered cannot be filled once more tokens were read: refused in one line."""
        if method.window == self.window:
            return
        held = self.attentions[0].queries_held
        if method.window > held and self.position > held:
            raise CKVError(
                f"method {method.name} scores with a {method.window}-token window but only the last {held} "
                "queries of the document were kept: read it again with this method"
            )
        for attention in self.attentions:
            attention.set_window(method.window)

    def keep_queries_for(self, methods: list[Method]):
        """Remember enough queries for each of ``methods``: a document read once can then
        be compressed by any of them (call before reading)."""
        widest = max(m.window for m in methods)
        for attention in self.attentions:
            attention.keep(widest)

    def reset(self):
        """Forget the document: empty caches and window queries."""
        self.caches = [EvictingKVCache(self.region) for _ in self.attentions]
        self.others = fresh_others(self.model)  # the layers that do not compress, by index
        for attention in self.attentions:
            attention.reset()
        self.stats = Stats()

    def snapshot(self) -> Snapshot:
        """A copy of the caches, window queries and stats, e.g. of a prefilled document."""
        return Snapshot([c.copy() for c in self.caches], [a.window_state() for a in self.attentions],
                        replace(self.stats), copies(self.others))

    def restore(self, snapshot: Snapshot):
        """Go back to a :meth:`snapshot`; it can be restored again later."""
        self.caches = [c.copy() for c in snapshot.caches]
        self.others = copies(snapshot.others)
        for attention, q in zip(self.attentions, snapshot.queries):
            attention.restore_window_state(q)
        self.stats = replace(snapshot.stats)

    def remembered_queries(self) -> list[mx.array | None]:
        """Every layer's remembered window queries as one array each (to save or store)."""
        return [a.remembered() for a in self.attentions]

    def take_over(self, caches: list[EvictingKVCache], queries: list[mx.array | None], others: dict | None = None):
        """Continue from caches, window queries and mlx-lm's caches of the other layers
        (``others``, by layer) read elsewhere (a saved session, a stored document);
        statistics start afresh."""
        others = others or {}
        if len(caches) != len(self.caches) or set(others) != set(self.others):
            raise CKVError(f"the cache has {len(caches)} compressing and {len(others)} other layers, the model "
                           f"{len(self.caches)} and {len(self.others)}: it was made with another model")
        for layer, cache in others.items():
            if type(cache) is not type(self.others[layer]):
                raise CKVError(f"the cache's layer {layer} is a {type(cache).__name__}, the model's a "
                               f"{type(self.others[layer]).__name__}: it was made with another model")
        self.reset()
        self.caches = caches
        self.others.update(others)
        for attention, q in zip(self.attentions, queries):
            attention.restore_window_state(q)

    def answer(
        self, snapshot: tuple, method: Method, budget: int | None, question: list[int], max_tokens: int
    ) -> list[int]:
        """Prefill once, compress many: from a prefilled document ``snapshot``, feed the
        ``question`` tokens, compress with ``method`` and generate greedily."""
        self.restore(snapshot)
        self.method = method
        logits = self.feed(question)
        self.compress(budget)
        return list(self.generate(logits, max_tokens))

    @property
    def kv_bytes(self) -> int:
        """KV bytes allocated now, over all layers (mlx-lm's own caches included)."""
        return sum(c.nbytes for c in self.caches) + sum(nbytes(c) for c in self.others.values())

    @property
    def kv_rows_bytes(self) -> int:
        """KV bytes of the rows holding tokens (at most :attr:`kv_bytes`)."""
        return sum(c.rows_nbytes for c in self.caches) + sum(nbytes(c) for c in self.others.values())

    @property
    def full_bytes(self) -> int:
        """What a full cache of every token seen so far allocates (256-row steps), beside
        what the layers that do not compress hold."""
        return self.bytes_per_token * allocated_rows(self.position) + sum(nbytes(c) for c in self.others.values())

    @property
    def bytes_per_token(self) -> int:
        """What one more token costs a full cache, over the layers that compress."""
        return sum(c.row_bytes for c in self.caches)

    @property
    def consistent(self) -> bool:
        """Whether every layer has seen the same tokens (an interrupt mid-step breaks it)."""
        others = [c.offset for c in self.others.values() if hasattr(c, "offset")]
        return len({c.offset for c in self.caches} | set(others)) == 1

    @property
    def position(self) -> int:
        """Logical position of the next token (tokens seen so far)."""
        return self.caches[0].offset

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

    def _evict_to(self, budgets: list[int]):
        """Cut every layer longer than its budget, one at a time (bounded transients)."""
        for layer, budget in enumerate(budgets):
            cache = self.caches[layer]
            if cache.length > budget:
                self._compress_layer(layer, budget)
                mx.eval(cache.arrays())

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
            self._eval_caches()
            self._record(len(piece))
            if progress:
                progress(start + len(piece), len(tokens))
        self.make_room(1)
        logits = self.model(mx.array([last]), cache=self.model_caches())[:, -1, :]
        self._record(1)
        if progress:
            progress(len(tokens), len(tokens))
        return logits

    @property
    def compressed(self) -> bool:
        return self.caches[0].compressed

    def _step(self, chunk: int) -> int:
        """Tokens per model call: ``chunk``, or at most the smallest region once compressed."""
        return min(chunk, *(c.region for c in self.caches)) if self.compressed else chunk

    def layer_budgets(self, avg_budget: int | None, method: Method | None = None) -> list[int] | None:
        """Each layer's share of ``avg_budget`` (tokens per layer, window included) under
        ``method`` (default: the session's); None for a method that keeps everything.
        Refuses a budget that is too small."""
        method = method or self.method
        if not method.compresses:
            return None
        check_budget(avg_budget, method.window)
        return method.layer_budgets(avg_budget, len(self.caches))

    def compress(self, avg_budget: int | None) -> list[int] | None:
        """Cut every layer to its share of ``avg_budget``. A prompt no longer than the
        budget is kept whole."""
        budgets = self.layer_budgets(avg_budget)
        if budgets is None:
            self._selected(None)
            return None
        start = time.perf_counter()
        budgets = prompt_budgets(budgets, self.caches[0].length, avg_budget)
        for layer, budget in enumerate(budgets):
            self._compress_layer(layer, budget, kv_bits=self.kv_bits)
        self._eval_caches()
        self.stats.compress_s = time.perf_counter() - start
        self._selected(budgets)
        return budgets

    def reselect(self, tokens: list[int], full: DiskFullCache, avg_budget: int | None) -> mx.array:
        """Read ``tokens`` against every row of the full cache on disk and keep each
        layer's share of ``avg_budget``, one layer at a time: the caches and logits that
        :meth:`feed` then :meth:`compress` give with the full cache in memory, holding
        at most one layer's full rows. ``tokens`` join the full cache's rows."""
        budgets = self.layer_budgets(avg_budget)
        total = full.tokens + len(tokens)
        if budgets is not None:
            budgets = prompt_budgets(budgets, total, avg_budget)
        start, kept = time.perf_counter(), []

        def keep(layer: int, keys: mx.array, values: mx.array):
            cache = EvictingKVCache.holding(keys, values, total, self.region)
            if budgets is not None:
                self._compress_layer(layer, budgets[layer], cache, self.kv_bits)
            mx.eval(cache.arrays())
            kept.append(cache)

        split = (len(tokens) - 1) // PREFILL_STEP * PREFILL_STEP  # the last piece, of at most a step, selects
        body, last = tokens[:split], tokens[split:]
        read_before = full.tail.tokens
        try:
            self.read_on_disk(body, full)  # their rows join the full cache; the last piece's window selects
            logits = full.read(self.model, last, self.model_caches(full.streamed(self.attentions, keep)))
        except BaseException:
            full.tail.truncate(read_before)  # an interrupted selection adds none of its pieces
            raise
        mx.eval([a.window_state() for a in self.attentions])
        self.caches = kept
        self.stats.reselect_s = time.perf_counter() - start
        self._selected(budgets)
        return logits

    def _selected(self, budgets: list[int] | None):
        """Record what the selection just made kept, beside what a full cache of the
        prompt read so far allocates: the one definition of both figures."""
        stats = self.stats
        stats.kv_bytes_full, stats.kv_bytes_kept, stats.kv_rows_kept = self.full_bytes, self.kv_bytes, self.kv_rows_bytes
        stats.layer_budgets = budgets

    def read_on_disk(self, tokens: list[int], full: DiskFullCache):
        """Read ``tokens`` against every row of the full cache on disk, in pieces, their
        rows joining it; nothing is kept in memory but the window queries."""
        for start in range(0, len(tokens), PREFILL_STEP):
            full.read(self.model, tokens[start : start + PREFILL_STEP], self.model_caches(full.streamed(self.attentions)))

    def forget_rows(self):
        """Free every row held (they are on disk), keeping the position, the window
        queries and what one row costs."""
        self.caches = [cache.emptied() for cache in self.caches]

    def _compress_layer(self, layer: int, budget: int, cache: EvictingKVCache | None = None,
                        kv_bits: KVBits | None = None):
        """Re-score layer ``layer`` and keep ``budget`` rows (packed by ``kv_bits``, or
        as the layer was kept before)."""
        compress_layer(cache or self.caches[layer], self.method, layer, self.attentions[layer], budget, kv_bits)

    def make_room(self, n: int):
        """Re-score and evict every compressed layer that cannot take ``n`` more rows."""
        for layer, cache in enumerate(self.caches):
            if cache.compressed and cache.free_slots() < n:
                self._compress_layer(layer, cache.budget)

    def teacher_force(self, logits: mx.array, tokens: list[int]) -> mx.array:
        """Log-probabilities ``[len(tokens), vocab]`` of each of ``tokens`` being next,
        feeding them in turn after ``logits`` (the fidelity measurement)."""
        rows = [logits.reshape(1, -1)]
        step = self._step(PREFILL_STEP)
        body = tokens[:-1]
        for start in range(0, len(body), step):
            chunk = body[start : start + step]
            self.make_room(len(chunk))
            rows.append(self.model(mx.array([chunk]), cache=self.model_caches())[0])
        out = mx.concatenate(rows).astype(mx.float32)
        return out - mx.logsumexp(out, axis=-1, keepdims=True)

    def generate(
        self,
        logits: mx.array,
        max_tokens: int,
        temp: float = 0.0,
        should_stop: Callable[[], bool] = lambda: False,
        repetition_penalty: float | None = None,
    ) -> Iterator[int]:
        """Sample up to ``max_tokens`` tokens, starting from ``logits``; stops at EOS.

        Pipelined like mlx-lm's ``generate_step``: the step that feeds a token runs
        (``mx.async_eval``) while that token is handed out. Every yielded token is in
        the cache, so a follow-up continues after the whole answer; a token that ends
        the answer (EOS, a stop request) is taken back out. ``repetition_penalty``
        (mlx-lm's) looks at the last 20 tokens of the answer.
        """
        sampler = make_sampler(temp)
        processors = make_logits_processors(repetition_penalty=repetition_penalty)
        eos = set(self.tokenizer.eos_token_ids)
        last = time.perf_counter()

        def clock():  # decode time so far, excluding the caller's time between tokens
            nonlocal last
            now = time.perf_counter()
            self.stats.decode_s += now - last
            last = now

        def choose(logits: mx.array, answer: mx.array | None) -> mx.array:
            for processor in processors if answer is not None else ():
                logits = processor(answer, logits)
            return sampler(logits - mx.logsumexp(logits, keepdims=True))

        def feed(token: mx.array, answer: mx.array) -> mx.array:
            self.make_room(1)
            logits = self.model(token.reshape(1, 1), cache=self.model_caches())[:, -1, :]
            return choose(logits, answer)

        token = choose(logits, None)
        answer = token
        try:
            for _ in range(max_tokens):
                queries = [a.window_state() for a in self.attentions]
                ahead = feed(token, answer)
                mx.async_eval(ahead)
                value = token.item()
                if value in eos or should_stop():
                    self._unfeed_last(queries)
                    break
                self.stats.generated_tokens += 1
                clock()
                yield value
                last = time.perf_counter()
                token, answer = ahead, mx.concatenate([answer, ahead]) if processors else None
        finally:
            clock()
            self.stats.peak_memory_bytes = max(
                self.stats.peak_memory_bytes, mx.get_peak_memory()
            )

    def _unfeed_last(self, queries: list):
        """Take back the token fed ahead of its check: its row and its window query. Where
        mlx-lm cannot take it out of its own caches (a full sliding window, a recurrent
        state), it stays in every layer, as in mlx-lm's own chat."""
        if not all_trimmable(self.others.values()):
            return
        for cache in self.others.values():
            cache.trim(1)
        for cache in self.caches:
            cache.trim(1)
        for attention, saved in zip(self.attentions, queries):
            attention.restore_window_state(saved)
