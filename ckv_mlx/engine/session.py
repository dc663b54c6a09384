"""The engine's session: one model with evicting caches, its layers' windows and one
compression method. Each job it does has its own file, joined here:

* ``reading.py``: reading a prompt, whole or in bounded chunks, into the store too;
* ``compression.py``: budgets, compression and eviction;
* ``reselection.py``: selecting from every row of the document's store on disk;
* ``decoding.py``: generation and teacher forcing;
* ``stats.py``: the statistics and the one definition of the bytes reported.

This file holds the state they share: the caches, the windows, the method, snapshots.
All MLX work of a session must happen on one thread (``runtime.py``).
"""

from __future__ import annotations

from dataclasses import replace
from functools import cached_property
from typing import NamedTuple

import mlx.core as mx

from ..errors import CKVError
from ..group.placement import placement
from ..group.ranks import Ranks
from ..kv.attention import observe
from ..kv.cache import EvictingKVCache
from ..kv.layer_caches import copies, fresh_others
from ..kv.quantized import KVBits, for_heads
from ..model.families import attention_modules
from ..policy.methods import Method
from ..text.words import word_ids, word_starts
from .compression import Compression
from .decoding import Decoding
from .reading import PREFILL_STEP, Reading
from .reselection import Reselection
from .stats import Accounting, Stats

__all__ = ["PREFILL_STEP", "Session", "Snapshot", "Stats"]


class Snapshot(NamedTuple):
    """Everything a session holds of what it read (see :meth:`Session.snapshot`)."""

    caches: list[EvictingKVCache]
    queries: list[tuple]  # each layer's window state
    stats: Stats
    others: dict  # copies of mlx-lm's own caches, by layer
    tokens: list[int] | None  # the tokens read, in order (None: not known, e.g. taken over from a store)


class Session(Reading, Compression, Reselection, Decoding, Accounting):
    """A model with evicting caches and one compression method.

    Under ``mlx.launch`` every rank runs a session of its part of the model (its layers,
    or its slice of every layer's heads: :attr:`placement`), each making the same calls in
    the same order; :attr:`ranks` is the group, which agrees on every plan."""

    def __init__(self, model, tokenizer, method: Method, region: int | None = None, kv_bits: KVBits | None = None):
        self.model, self.tokenizer, self._method = model, tokenizer, method
        self.region = region
        self.attentions = observe(attention_modules(model), method.window)
        self.placement, self.ranks = placement(model), Ranks()
        self._recorder = None
        self.reset()
        mx.eval(model(mx.array([[0]]), cache=self.model_caches()))  # each window sees how its layer attends
        self._head_dims = {c.keys.shape[-1] for c in self.caches if c.keys is not None}
        self.heads = self.placement.heads(self.attentions[0].n_heads, self.attentions[0].n_kv_heads)
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
        self.tokens: list[int] | None = []  # every token whose row the caches hold or held, in order

    def snapshot(self) -> Snapshot:
        """A copy of the caches, window queries and stats, e.g. of a prefilled document."""
        return Snapshot([c.copy() for c in self.caches], [a.window_state() for a in self.attentions],
                        replace(self.stats), copies(self.others), None if self.tokens is None else list(self.tokens))

    def restore(self, snapshot: Snapshot):
        """Go back to a :meth:`snapshot`; it can be restored again later."""
        self.caches = [c.copy() for c in snapshot.caches]
        self.others = copies(snapshot.others)
        for attention, q in zip(self.attentions, snapshot.queries):
            attention.restore_window_state(q)
        self.stats = replace(snapshot.stats)
        self.tokens = None if snapshot.tokens is None else list(snapshot.tokens)

    def remembered_queries(self) -> list[mx.array | None]:
        """Every layer's remembered window queries as one array each (to save or store)."""
        return [a.remembered() for a in self.attentions]

    def take_over(self, caches: list[EvictingKVCache], queries: list[mx.array | None], others: dict | None = None,
                  tokens: list[int] | None = None):
        """Continue from caches, window queries and mlx-lm's caches of the other layers
        (``others``, by layer) read elsewhere (a saved session, a stored document), of
        ``tokens`` if known; statistics start afresh."""
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
        self.tokens = None if tokens is None else list(tokens)

    def note_read(self, tokens: list[int]):
        """``tokens`` now have rows in the caches, after those read before."""
        if self.tokens is not None:
            self.tokens.extend(tokens)

    def words(self, cache: EvictingKVCache) -> mx.array | None:
        """Each of ``cache``'s rows' word number, for a method that uses them (``wordN``),
        when its rows are every token read, in order (before any eviction) and the
        tokenizer shows which tokens begin words."""
        if not self.method.word or self.tokens is None or cache.compressed \
                or not cache.length == cache.offset == len(self.tokens):
            return None
        return None if self._word_starts is None else mx.array(word_ids(self._word_starts, self.tokens))

    @cached_property
    def _word_starts(self):
        """Per vocabulary id, whether the token begins a word (None: the tokenizer cannot say)."""
        return word_starts(self.tokenizer)

    @property
    def consistent(self) -> bool:
        """Whether every layer has seen the same tokens (an interrupt mid-step breaks it)."""
        others = [c.offset for c in self.others.values() if hasattr(c, "offset")]
        return len({c.offset for c in self.caches} | set(others)) == 1

    @property
    def position(self) -> int:
        """Logical position of the next token (tokens seen so far)."""
        return self.caches[0].offset

    @property
    def compressed(self) -> bool:
        return self.caches[0].compressed
