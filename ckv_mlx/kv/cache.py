"""A per-layer KV cache that can evict: logical position apart from physical rows.

Before compression it grows like mlx-lm's ``KVCache`` (in steps of 256 rows).
``compress(keep, budget)`` keeps the given rows (a token set per KV head, or one for
all) and fixes the capacity at ``budget + region``: new tokens fill the region, and the
caller evicts back to the budget before it overflows, so the memory of a compressed
layer is bounded. ``nbytes`` is what is allocated (the capacity), as in mlx-lm;
``rows_nbytes`` is the part holding tokens. With ``kv_bits`` the kept rows are stored
quantized (``quantized.py``). Per-head budgets (AdaKV) keep unequal rows per KV head: a
head keeping fewer than the layer's widest fills the rest with padding rows that
attention never sees (:meth:`EvictingKVCache.visible_rows`); they are allocated, so
``nbytes`` counts them.
"""

from __future__ import annotations

import mlx.core as mx
import mlx_lm.models.cache as mlx_lm_cache
from mlx_lm.models.base import create_causal_mask
from mlx_lm.models.cache import _BaseCache

from .quantized import KVBits, Packed, QuantizedRows, cut, joined, packed_rows, take, take_rows

GROWTH_STEP = 256  # rows a cache grows by before compression, as mlx-lm's KVCache
REGION_SHARE = 4  # by default a layer's region is a quarter of its budget ...
MIN_REGION = 8  # ... and at least this many rows


def default_region(budget: int) -> int:
    """Rows for new tokens beside a layer's ``budget``: a quarter of it, at least 8, so
    a compressed layer allocates at most 1.25x its budget (or budget + 8 rows)."""
    return max(MIN_REGION, -(-budget // REGION_SHARE))


def allocated_rows(tokens: int, step: int = GROWTH_STEP) -> int:
    """Rows a growing cache allocates for ``tokens``: rounded up to whole steps."""
    return -(-tokens // step) * step


class EvictingKVCache(_BaseCache):
    """KV rows of one layer, ``[1, kv_heads, rows, head_dim]``, in position order.

    ``region`` is the rows for new tokens once compressed; None: :func:`default_region`
    of the layer's budget. Compressed with ``kv_bits``, the kept rows are packed
    (:attr:`packed`) and :attr:`keys` / :attr:`values` hold only the region's rows after
    them, in full precision, until the next re-score packs those it keeps.
    """

    step = GROWTH_STEP

    def __init__(self, region: int | None = None):
        self.keys = None  # full-precision rows: all of them, or those after the packed ones
        self.values = None
        self.packed: tuple[Packed, Packed] | None = None  # the kept keys and values, quantized
        self.kv_bits: KVBits | None = None
        self.offset = 0
        self.length = 0  # rows held, packed ones included
        self.budget: int | None = None
        self.region_setting = region
        self.valid: mx.array | None = None  # [kv_heads, kept rows] bool, False on padding; None: none

    @property
    def region(self) -> int:
        """Rows for new tokens beside the budget (before compression: the default's)."""
        if self.region_setting is not None:
            return self.region_setting
        return default_region(self.budget or 0)

    @property
    def packed_rows(self) -> int:
        return 0 if self.packed is None else packed_rows(self.packed[0])

    @property
    def capacity(self) -> int:
        return self.packed_rows + (0 if self.keys is None else self.keys.shape[2])

    @property
    def compressed(self) -> bool:
        return self.budget is not None

    @property
    def bound(self) -> int:
        """Rows a compressed layer holds before its region: its budget, or the widest
        head's kept rows where per-head budgets made them more."""
        return max(self.budget, 0 if self.valid is None else self.valid.shape[1])

    def free_slots(self) -> int:
        """Rows that can be appended before a compressed layer must evict."""
        return self.bound + self.region - self.length

    def visible_rows(self) -> mx.array | None:
        """Which held rows each KV head attends to, ``[kv_heads, length]`` bool (None:
        every row, no padding)."""
        if self.valid is None:
            return None
        kv_heads, kept = self.valid.shape
        region = mx.ones((kv_heads, max(self.length - kept, 0)), mx.bool_)
        return mx.concatenate([self.valid, region], axis=1)[:, : self.length]

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        self._append(keys, values)
        self.offset += keys.shape[2]
        if self.packed is None:
            return self.keys_and_values()
        return tuple(QuantizedRows(p, r, self.kv_bits) for p, r in zip(self.packed, self._unpacked()))

    def _append(self, keys: mx.array, values: mx.array):
        n = keys.shape[2]
        if self.length + n > self.capacity:
            self._grow(keys, values, self.length + n)
        start = self.length - self.packed_rows
        self.keys[..., start : start + n, :] = keys
        self.values[..., start : start + n, :] = values
        self.length += n

    def _grow(self, keys: mx.array, values: mx.array, needed: int):
        used = self.length - self.packed_rows
        if self.packed is not None:
            size = max(needed - self.packed_rows, self.region)
        elif self.compressed:
            size = max(needed, self.bound + self.region)
        else:
            size = allocated_rows(needed, self.step)
        self.keys = _resized(self.keys, keys, used, size)
        self.values = _resized(self.values, values, used, size)

    def compress(self, keep: mx.array, budget: int, kv_bits: KVBits | None = None):
        """Keep rows ``keep`` (``[kv_heads or 1, k]``, sorted; -1: a padding row of a
        head keeping fewer) and bound the layer.

        ``budget`` is the number of rows eviction returns to; the capacity becomes
        ``budget + region`` (or k + region, for k > budget). With ``kv_bits`` (kept from
        then on) the kept rows are packed and only the region's rows are in full precision.
        """
        kv_bits = kv_bits or self.kv_bits
        if self.packed is not None and kv_bits != self.kv_bits:  # other bits: from the rows as they read now
            self.keys, self.values = self.keys_and_values()
            self.packed = None
        keep, self.valid = self._visible_selection(keep, budget)
        self.budget = budget
        if kv_bits is None:
            kept_k, kept_v = (take_rows(x, keep) for x in self.keys_and_values())
            self.keys = self.values = None
            self.length = 0
            self._append(kept_k, kept_v)
            return
        self.packed = self._packed_selection(keep, kv_bits)
        self.kv_bits, self.length = kv_bits, keep.shape[-1]
        self.keys, self.values = (mx.zeros((*x.shape[:2], self.region, x.shape[3]), x.dtype)
                                  for x in (self.keys, self.values))

    def _visible_selection(self, keep: mx.array, budget: int) -> tuple[mx.array, mx.array | None]:
        """``keep``'s rows (padding at row 0) and which each KV head sees: not padding,
        and not padding before (None: all, and no more rows than ``budget``; a rank
        holding only the widest heads of a layer keeps the mask, whose width bounds it)."""
        rows = mx.maximum(keep, 0)
        visible = keep >= 0
        held = self.visible_rows()
        if held is not None:
            visible = visible & mx.take_along_axis(held, mx.broadcast_to(rows, (held.shape[0], rows.shape[-1])), axis=1)
        return rows, (None if keep.shape[-1] <= budget and visible.all().item() else visible)

    def _packed_selection(self, keep: mx.array, kv_bits: KVBits) -> tuple[Packed, Packed]:
        """Rows ``keep`` packed: rows packed before are taken as they are, full ones
        packed (the first time only the kept ones: never the whole prompt)."""
        rest = self._unpacked()
        if self.packed is None:
            return tuple(kv_bits.pack(take_rows(x, keep)) for x in rest)
        if not rest[0].shape[2]:
            return tuple(take(p, keep) for p in self.packed)
        return tuple(take(joined(p, kv_bits.pack(x)), keep) for p, x in zip(self.packed, rest))

    def _unpacked(self) -> tuple[mx.array, mx.array]:
        """The full-precision rows held (all, or those after the packed ones)."""
        rows = self.length - self.packed_rows
        return self.keys[..., :rows, :], self.values[..., :rows, :]

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        """Forget the latest ``n`` rows (and their positions); returns how many."""
        n = min(n, self.length)
        if n > self.length - self.packed_rows:
            self.packed = tuple(cut(p, self.length - n) for p in self.packed)
        self.length -= n
        self.offset -= n
        return n

    def copy(self) -> "EvictingKVCache":
        """An independent copy (MLX arrays are updated in place by slice assignment;
        packed rows never are, so they are shared)."""
        twin = EvictingKVCache(self.region_setting)
        twin.offset, twin.length, twin.budget = self.offset, self.length, self.budget
        twin.packed, twin.kv_bits, twin.valid = self.packed, self.kv_bits, self.valid
        if self.keys is not None:
            twin.keys, twin.values = mx.array(self.keys), mx.array(self.values)
        return twin

    def emptied(self) -> "EvictingKVCache":
        """A cache at the same position holding no rows (it keeps what one row costs)."""
        twin = EvictingKVCache(self.region_setting)
        twin.offset = self.offset
        if self.keys is not None:
            twin.keys, twin.values = (mx.zeros((*x.shape[:2], 0, x.shape[3]), x.dtype) for x in (self.keys, self.values))
        return twin

    def keys_and_values(self):
        """The held rows in full precision (packed ones dequantized): ``(keys,
        values)``, each ``[1, kv_heads, length, head_dim]``."""
        rest = self._unpacked()
        if self.packed is None:
            return rest
        return tuple(mx.concatenate([self.kv_bits.unpack(p), r], axis=2) for p, r in zip(self.packed, rest))

    def arrays(self) -> list[mx.array]:
        """Every array the cache allocates."""
        held = [] if self.keys is None else [self.keys, self.values]
        return held + [x for p in self.packed or () for x in p] + ([] if self.valid is None else [self.valid])

    def size(self) -> int:
        return self.length

    def empty(self) -> bool:
        return self.keys is None

    @property
    def row_bytes(self) -> int:
        """Bytes of one token's full-precision keys and values over all KV heads (0
        while empty): what one more token costs a full cache."""
        if self.keys is None:
            return 0
        return self.keys.shape[1] * (self.keys.shape[3] + self.values.shape[3]) * self.keys.dtype.size

    @property
    def nbytes(self) -> int:
        """Bytes allocated: the whole capacity (as mlx-lm counts), packed rows with
        their scales and biases."""
        return sum(x.nbytes for x in self.arrays())

    @property
    def rows_nbytes(self) -> int:
        """Bytes of the rows holding tokens (at most :attr:`nbytes`)."""
        packed = sum(x.nbytes for p in self.packed or () for x in p)
        held = packed + (self.length - self.packed_rows) * self.row_bytes
        if self.valid is None:
            return held
        kv_heads, kept = self.valid.shape
        per_head_row = (packed // self.packed_rows if self.packed else self.row_bytes) // kv_heads
        return held - (kv_heads * kept - self.valid.sum().item()) * per_head_row

    def make_mask(self, n: int, return_array: bool = False, window_size=None):
        if window_size is not None or return_array:
            return create_causal_mask(n, self.length, window_size=window_size)
        return "causal" if n > 1 else None

    @property
    def state(self) -> list:
        """mlx-lm's cache protocol (0.32): what :meth:`from_state` rebuilds the cache from,
        arrays and scalars: the full-precision rows (all, or those after the packed ones),
        the packed keys and values (``(weights, scales, biases)`` or None), the padding
        mask (uint8 or None), then offset, budget, region, bits and group size (0: none)."""
        rows = (None, None) if self.keys is None else self._unpacked()
        bits, group_size = (self.kv_bits.bits, self.kv_bits.group_size or 0) if self.kv_bits else (0, 0)
        return [*rows, *(self.packed or (None, None)), None if self.valid is None else self.valid.astype(mx.uint8),
                self.offset, self.budget or 0, self.region_setting or 0, bits, group_size]

    @state.setter
    def state(self, v):
        keys, values, packed_keys, packed_values, valid, offset, budget, region, bits, group_size = v
        self.keys, self.values = keys, values
        self.packed = None if packed_keys is None else (tuple(packed_keys), tuple(packed_values))
        self.valid = None if valid is None else valid.astype(mx.bool_)
        self.offset, self.budget, self.region_setting = int(offset), int(budget) or None, int(region) or None
        self.kv_bits = KVBits(int(bits), int(group_size) or None) if bits else None
        self.length = self.packed_rows + (0 if keys is None else keys.shape[2])

    @classmethod
    def from_state(cls, state) -> "EvictingKVCache":
        cache = cls()
        cache.state = state
        return cache

    @classmethod
    def holding(cls, keys: mx.array, values: mx.array, offset: int, region: int | None = None,
                length: int | None = None) -> "EvictingKVCache":
        """An uncompressed cache at position ``offset`` whose buffers are ``keys`` and
        ``values``, the first ``length`` rows (default all) holding tokens."""
        cache = cls(region)
        cache.keys, cache.values, cache.offset = keys, values, offset
        cache.length = keys.shape[2] if length is None else length
        return cache


mlx_lm_cache.EvictingKVCache = EvictingKVCache  # what mlx-lm's load_prompt_cache looks a saved cache up by


def _resized(old: mx.array | None, like: mx.array, used: int, size: int) -> mx.array:
    """A zero buffer of ``size`` rows shaped like ``like``, holding ``old[:used]``."""
    new = mx.zeros((*like.shape[:2], size, like.shape[3]), like.dtype)
    if old is not None and used:
        new[..., :used, :] = old[..., :used, :]
    return new
