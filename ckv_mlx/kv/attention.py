"""The window queries of mlx-lm's own attention, seen where it attends.

Every mlx-lm attention module ends in ``base.scaled_dot_product_attention(queries, keys,
values, cache, scale, mask, sinks=None)`` with its layer's cache. :func:`observe` puts a
pass-through in that name's place in the model's modules: a call whose cache is one of
ours (it carries its layer's :class:`LayerWindow` as ``window``) has its queries
remembered first, exactly as the attention uses them (post-RoPE, after any scaling),
with the scale and attention sinks it attends with. Keys and values that a compressed
layer keeps quantized (``quantized.QuantizedRows``) are attended where they lie, also by
a layer reading another's KV (Gemma 4). Any other call, plain mlx-lm's, is left alone.
The model itself, its parameters and its outputs are never changed.
"""

from __future__ import annotations

import sys
import weakref

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import base
from mlx_lm.models.base import create_causal_mask

from . import quantized
from ..errors import CKVError
from ..profiles import Defaults

SDPA = "scaled_dot_product_attention"
_mlx_lm_sdpa = getattr(base, "_ckv_mlx_lm_sdpa", base.scaled_dot_product_attention)


class LayerWindow:
    """The latest ``window`` queries of one layer, and what its attention scores with.

    ``tap``, when set, sees every call's queries, cached keys and values and per-head
    output ``[b, n_heads, n, head_dim]`` (before the output projection) and returns the
    output to use: the profiler records attention with it, the ablation masks heads.
    """

    def __init__(self, attention: nn.Module | None = None, window: int = Defaults.window):
        self.o_proj = getattr(attention, "o_proj", None)  # what a tap applies to per-head outputs
        self.window = window  # the latest queries that score
        self.kept = window  # the latest queries remembered: the widest window installed so far
        self.tap = None
        self.scale: float | None = None  # set by the first call, as are the heads and sinks
        self.sinks: mx.array | None = None
        self.n_heads = self.n_kv_heads = 0
        self._pieces: list[mx.array] = []  # the latest queries, oldest first, joined only when read
        self._held = 0

    @property
    def window_queries(self) -> mx.array:
        """The latest queries that score, ``[n_heads, <= window, head_dim]``."""
        return self.remembered()[0, :, -self.window :, :]

    @property
    def queries_held(self) -> int:
        """How many of the latest queries are remembered (at most :attr:`kept`)."""
        return self._held

    def remembered(self) -> mx.array | None:
        """Every query remembered, ``[1, n_heads, queries_held, head_dim]`` (e.g. to save)."""
        if len(self._pieces) > 1:
            self._pieces = [mx.concatenate(self._pieces, axis=2)]
        return self._pieces[0] if self._pieces else None

    def set_window(self, window: int):
        """Score with the latest ``window`` queries; remember at least that many from now on."""
        self.window = window
        self.keep(window)

    def keep(self, queries: int):
        """Remember at least the latest ``queries`` queries from now on."""
        self.kept = max(self.kept, queries)

    def reset(self):
        self._pieces, self._held = [], 0

    def window_state(self) -> tuple:
        """What is remembered, for :meth:`restore_window_state` (cheap: references)."""
        return tuple(self._pieces)

    def restore_window_state(self, state: tuple | mx.array | None):
        """Go back to a :meth:`window_state`, or to queries saved as one array."""
        pieces = [] if state is None else [state] if isinstance(state, mx.array) else list(state)
        self._pieces, self._held = pieces, sum(p.shape[2] for p in pieces)

    def attend(self, queries, keys, values, cache, scale, mask, sinks) -> mx.array:
        """mlx-lm's attention of this layer, its queries remembered on the way."""
        self.scale, self.sinks = scale, sinks
        self.n_heads, self.n_kv_heads = queries.shape[1], keys.shape[1]
        self._remember(queries)
        out = attention(queries, keys, values, cache, scale, mask, sinks)
        return out if self.tap is None else self.tap(self, queries, keys, values, out)

    def _remember(self, queries: mx.array):
        """Keep the latest :attr:`kept` queries; a decode step appends its one query to a
        list (no copy: joining waits until the queries are read)."""
        if queries.shape[2] >= self.kept:  # a copy: a view would keep the whole chunk's queries alive
            self._pieces, self._held = [mx.contiguous(queries[:, :, -self.kept :, :])], self.kept
            return
        self._pieces.append(queries)
        self._held += queries.shape[2]
        while self._held - self._pieces[0].shape[2] >= self.kept:
            self._held -= self._pieces.pop(0).shape[2]
        if self._held > self.kept:  # part of the oldest piece is one too many
            self._pieces[0] = mx.contiguous(self._pieces[0][:, :, self._held - self.kept :, :])
            self._held = self.kept


def attention(queries, keys, values, cache, scale, mask=None, sinks=None) -> mx.array:
    """mlx-lm's attention, or over rows kept partly quantized; a cache's padding rows
    (per-head budgets) hidden from every query head of their KV head, also from a layer
    that reads another's rows with no cache (Gemma 4's KV sharing: :func:`_rows_cache`).
    A mask array made from another layer's length (mlx-lm makes one from the first
    layer's cache; ours hold different numbers of rows once compressed) is made again
    from this layer's."""
    rows = _rows_cache(keys, cache)
    if isinstance(mask, mx.array) and rows is not None and mask.shape[-1] != keys.shape[2]:
        mask = create_causal_mask(queries.shape[2], keys.shape[2] - queries.shape[2])  # made from another layer's length
    visible = None if rows is None else rows.visible_rows()
    if visible is not None:
        mask = with_visible_rows(mask, visible, queries.shape)
    if isinstance(keys, quantized.QuantizedRows):
        return quantized.attention(queries, keys, values, scale, mask, sinks)
    return _mlx_lm_sdpa(queries, keys, values, cache, scale=scale, mask=mask, sinks=sinks)


_RETURNED: dict[int, tuple[weakref.ref, weakref.ref]] = {}  # id(rows) -> (rows, the cache of ours that returned them)


def _rows_cache(keys, cache):
    """The cache of ours whose rows ``keys`` are: ``cache`` itself, or, for a call with
    none, the cache that returned these very rows to an earlier layer (remembered weakly,
    while they live)."""
    rows = keys.rest if isinstance(keys, quantized.QuantizedRows) else keys
    if hasattr(cache, "visible_rows"):
        _RETURNED[id(rows)] = (weakref.ref(rows, lambda _, key=id(rows): _RETURNED.pop(key, None)), weakref.ref(cache))
        return cache
    if cache is None and (seen := _RETURNED.get(id(rows))) is not None and seen[0]() is rows:
        return seen[1]()
    return None


def with_visible_rows(mask, visible: mx.array, query_shape) -> mx.array:
    """mlx-lm's ``mask`` (None, "causal", boolean or additive) and ``visible``
    (``[kv_heads, S]``) as one ``[1, n_heads, L, S]`` mask."""
    _, n_heads, length, _ = query_shape
    kv_heads, rows = visible.shape
    seen = mx.repeat(visible, n_heads // kv_heads, axis=0)[None, :, None, :]
    if mask is None:
        return seen
    if isinstance(mask, str):
        mask = create_causal_mask(length, rows - length)
    if mask.dtype == mx.bool_:
        return seen & mask
    return mx.where(seen, mask, mx.finfo(mask.dtype).min)


def observed_sdpa(queries, keys, values, cache, scale, mask=None, sinks=None):
    """mlx-lm's ``scaled_dot_product_attention``, seen by our caches' layer windows."""
    window = getattr(cache, "window", None)
    if window is None:
        return attention(queries, keys, values, cache, scale, mask, sinks)
    out = window.attend(queries, keys, values, cache, scale, mask, sinks)
    if hasattr(cache, "attended"):  # e.g. a layer read from disk, selecting once its window is new
        cache.attended()
    return out


def joined(state: tuple) -> mx.array | None:
    """The queries of a :meth:`LayerWindow.window_state` as one array (to save)."""
    return mx.concatenate(list(state), axis=2) if state else None


def observe_models_loaded_from_now():
    """Put the pass-through in mlx-lm's ``base`` module, where every model file imported
    from now on takes its attention from: a model mlx-lm loads after ``import ckv_mlx``
    needs no :func:`observe` before a cache of ours is used with it (a saved one, say)."""
    base._ckv_mlx_lm_sdpa = _mlx_lm_sdpa
    setattr(base, SDPA, observed_sdpa)


def observe(attentions: list[nn.Module], window: int = Defaults.window) -> list[LayerWindow]:
    """One :class:`LayerWindow` per attention module in ``attentions`` (the layers whose
    cache compresses), their modules' attention calls made visible (idempotent)."""
    for attention in attentions:
        module = sys.modules[type(attention).__module__]
        if getattr(module, SDPA, None) not in (_mlx_lm_sdpa, observed_sdpa):
            raise CKVError(f"{type(attention).__name__} ({module.__name__}) does not attend through mlx-lm's "
                           f"{SDPA}: its window queries cannot be seen")
        setattr(module, SDPA, observed_sdpa)
    return [LayerWindow(attention, window) for attention in attentions]


observe_models_loaded_from_now()
