"""A per-layer KV cache that can evict: logical position apart from physical rows.

Before compression it grows like mlx-lm's ``KVCache`` (in steps of 256 rows).
``compress(keep, budget)`` keeps the given rows (a token set per KV head, or one for
all) and fixes the capacity at ``budget + region``: new tokens fill the region, and the
caller evicts back to the budget before it overflows, so the memory of a compressed
layer is bounded. ``nbytes`` is what is allocated (the capacity), as in mlx-lm;
``rows_nbytes`` is the part holding tokens.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models.base import create_causal_mask
from mlx_lm.models.cache import _BaseCache

from .errors import CKVError

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
    of the layer's budget.
    """

    step = GROWTH_STEP

    def __init__(self, region: int | None = None):
        self.keys = None
        self.values = None
        self.offset = 0
        self.length = 0
        self.budget: int | None = None
        self.region_setting = region

    @property
    def region(self) -> int:
        """Rows for new tokens beside the budget (before compression: the default's)."""
        if self.region_setting is not None:
            return self.region_setting
        return default_region(self.budget or 0)

    @property
    def capacity(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    @property
    def compressed(self) -> bool:
        return self.budget is not None

    def free_slots(self) -> int:
        """Rows that can be appended before a compressed layer must evict."""
        return self.budget + self.region - self.length

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        self._append(keys, values)
        self.offset += keys.shape[2]
        return self.fetch()

    def _append(self, keys: mx.array, values: mx.array):
        n = keys.shape[2]
        if self.length + n > self.capacity:
            self._grow(keys, values, self.length + n)
        start, self.length = self.length, self.length + n
        self.keys[..., start : self.length, :] = keys
        self.values[..., start : self.length, :] = values

    def _grow(self, keys: mx.array, values: mx.array, needed: int):
        if self.compressed:
            size = max(needed, self.budget + self.region)
        else:
            size = allocated_rows(needed, self.step)
        self.keys = _resized(self.keys, keys, self.length, size)
        self.values = _resized(self.values, values, self.length, size)

    def compress(self, keep: mx.array, budget: int):
        """Keep rows ``keep`` (``[kv_heads or 1, k]``, sorted) and bound the layer.

        ``budget`` (>= k) is the number of rows eviction returns to; the capacity
        becomes ``budget + region``.
        """
        kept_k, kept_v = (_take_rows(x, keep) for x in self.fetch())
        self.budget = max(budget, keep.shape[-1])
        self.keys = self.values = None
        self.length = 0
        self._append(kept_k, kept_v)

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        """Forget the latest ``n`` rows (and their positions); returns how many."""
        n = min(n, self.length)
        self.length -= n
        self.offset -= n
        return n

    def copy(self) -> "EvictingKVCache":
        """An independent copy (MLX arrays are updated in place by slice assignment)."""
        twin = EvictingKVCache(self.region_setting)
        twin.offset, twin.length, twin.budget = self.offset, self.length, self.budget
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

    def fetch(self):
        """The held rows: ``(keys, values)``, each ``[1, kv_heads, length, head_dim]``."""
        return self.keys[..., : self.length, :], self.values[..., : self.length, :]

    def size(self) -> int:
        return self.length

    def empty(self) -> bool:
        return self.keys is None

    @property
    def row_bytes(self) -> int:
        """Bytes of one token's keys and values over all KV heads (0 while empty)."""
        if self.keys is None:
            return 0
        return self.keys.shape[1] * (self.keys.shape[3] + self.values.shape[3]) * self.keys.dtype.size

    @property
    def nbytes(self) -> int:
        """Bytes allocated for keys and values (the whole capacity, as mlx-lm counts)."""
        return self.capacity * self.row_bytes

    @property
    def rows_nbytes(self) -> int:
        """Bytes of the rows holding tokens (at most :attr:`nbytes`)."""
        return self.length * self.row_bytes

    def make_mask(self, n: int, return_array: bool = False, window_size=None):
        if window_size is not None or return_array:
            return create_causal_mask(n, self.length, window_size=window_size)
        return "causal" if n > 1 else None

    @property
    def state(self):
        return self.fetch() if self.keys is not None else []

    @state.setter
    def state(self, v):
        self.keys, self.values = v
        self.length = self.keys.shape[2]

    @property
    def meta_state(self):
        return (str(self.offset), str(self.budget or 0), str(self.region_setting or 0))

    @meta_state.setter
    def meta_state(self, v):
        offset, budget, region = (int(x) for x in v)
        self.offset, self.region_setting = offset, region or None
        self.budget = budget or None

    @classmethod
    def from_state(cls, state, meta_state) -> "EvictingKVCache":
        cache = cls()
        cache.state = state
        cache.meta_state = meta_state
        return cache


def _take_rows(x: mx.array, rows: mx.array) -> mx.array:
    """Gather ``rows`` (``[heads or 1, k]``) along the sequence axis of ``x``."""
    heads, dim = x.shape[1], x.shape[3]
    index = mx.broadcast_to(rows[None, :, :, None], (1, heads, rows.shape[-1], dim))
    return mx.take_along_axis(x, index, axis=2)


def _resized(old: mx.array | None, like: mx.array, used: int, size: int) -> mx.array:
    """A zero buffer of ``size`` rows shaped like ``like``, holding ``old[:used]``."""
    new = mx.zeros((*like.shape[:2], size, like.shape[3]), like.dtype)
    if old is not None and used:
        new[..., :used, :] = old[..., :used, :]
    return new


def save_caches(path: str | Path, caches: list[EvictingKVCache], metadata: dict,
                extra: dict[str, mx.array] | None = None) -> None:
    """Write caches, ``extra`` named arrays and JSON-able ``metadata`` to one safetensors
    file, atomically (a temporary file, then a rename)."""
    path = Path(path)
    arrays = {f"cache.{k}": v for k, v in tree_flatten([c.state for c in caches])}
    meta = {"ckv": json.dumps({**metadata, "layers": [c.meta_state for c in caches]})}
    tmp = path.with_name(f".{path.name}.tmp.safetensors")
    try:
        mx.save_safetensors(str(tmp), {**arrays, **(extra or {})}, metadata=meta)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        tmp.unlink(missing_ok=True)
        raise CKVError(f"cannot write {path}: {e}; choose a writable path") from e


def load_caches(path: str | Path) -> tuple[list[EvictingKVCache], dict, dict[str, mx.array]]:
    """Read what :func:`save_caches` wrote: ``(caches, metadata, extra)``."""
    arrays, meta = mx.load(str(path), format="safetensors", return_metadata=True)
    info = json.loads(meta["ckv"])
    states = tree_unflatten([(k[len("cache."):], v) for k, v in arrays.items() if k.startswith("cache.")])
    extra = {k: v for k, v in arrays.items() if not k.startswith("cache.")}
    layers = info.pop("layers")
    caches = [EvictingKVCache.from_state(s, m) for s, m in zip(states, layers)]
    return caches, info, extra
