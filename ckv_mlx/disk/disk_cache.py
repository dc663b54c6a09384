"""A conversation's full cache on disk, read one layer at a time.

It is the document's :class:`~ckv_mlx.disk.store.Store` (shared, never changed) followed by
the conversation's tail (the questions and answers read against the full cache, in a
private folder removed on :meth:`DiskFullCache.close`), and beside it mlx-lm's caches of
the layers that do not compress as they stand where the rows end (:meth:`set_aside`): the
next selection starts them from there, so memory holds no second copy of them.
:meth:`DiskFullCache.streamed` gives the per-layer caches of one model call: each reads
its layer's rows from disk when that layer runs, appends the call's new rows to the tail,
and once the attention has seen the call's queries hands the whole layer to a ``keep``
callback (the selection).
Each layer first
evaluates its input, so the layer below has finished and its full rows are freed: at
most one layer's full rows are in memory at a time.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Callable

import mlx.core as mx
import numpy as np
from mlx_lm.models.base import create_causal_mask
from mlx_lm.models.cache import _BaseCache

from ..kv.cache import EvictingKVCache, allocated_rows
from ..errors import CKVError
from ..safetensors_file import read_caches, write_caches
from ..kv.quantized import KVBits
from .store import (
    CONVERSATIONS, LEASE, OTHERS, LayerRows, Store, StoreCorrupt, disk_error, open_store,
)

Keep = Callable[[int, mx.array, mx.array], None]


class DiskFullCache:
    """The document's stored rows, then the conversation's, for every layer."""

    def __init__(self, store: Store, scratch: Path):
        self.store = store
        folder = Path(scratch) / f"{os.getpid()}-{uuid.uuid4().hex[:8]}"  # the process, for store.prune
        try:
            folder.mkdir(parents=True)
            (folder / LEASE).write_text(store.path.name)  # no prune removes the store while this reads it
        except OSError as error:
            raise disk_error(Path(scratch).parent, error) from None
        self.tail = LayerRows(folder, len(store.manifest["layers"]), store.kv_bits)

    @property
    def tokens(self) -> int:
        return self.store.tokens + self.tail.tokens

    @property
    def nbytes(self) -> int:
        """Bytes on disk: the document's store and the conversation's tail."""
        return self.store.nbytes + self.tail.nbytes

    @property
    def layer_bytes(self) -> int:
        """Bytes of the largest layer's rows in memory (in the store's dtype, unpacked):
        what a selection holds of the full cache."""
        layers = range(len(self.tail.shapes))
        return max(self.tokens * self.store.dtype.size * self.store.shape(layer)[0] * sum(self.store.shape(layer)[1:])
                   for layer in layers)

    def layer(self, layer: int, room: int = 0) -> tuple[mx.array, mx.array]:
        """Every row of layer ``layer``, the document's then the conversation's, in
        buffers with ``room`` rows free at the end, ``[1, kv_heads, tokens + room, dim]``."""
        return _read([self.store.files(layer), self.tail.files(layer)], room)

    def tail_bytes(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """The conversation's rows, to save: per layer, its keys' and values' file bytes
        as they are (packed rows stay packed); none before the conversation wrote any."""
        files = [self.tail.files(layer) for layer in range(len(self.tail.shapes))]
        return [tuple(np.fromfile(f.path, dtype=np.uint8, count=f.nbytes) for f in pair) for pair in files if pair]

    def restore_tail(self, tail: list[tuple[np.ndarray, np.ndarray]], tokens: int):
        """Write back the ``tokens`` rows of the conversation that :meth:`tail_bytes` gave."""
        if not tokens:
            return
        for layer, pair in enumerate(tail):
            self.tail.restore_layer(layer, self.store.shape(layer), self.store.dtype, list(pair))
        self.tail.advance(tokens)

    def empty_caches(self, region: int | None = None) -> list[EvictingKVCache]:
        """Caches at the end of what is on disk that hold no rows (a session's state
        when every row is here), shaped and typed as the stored rows."""
        caches = []
        for layer in range(len(self.tail.shapes)):
            keys, values = (mx.zeros((1, f.heads, 0, f.dim), f.dtype) for f in self.store.files(layer))
            caches.append(EvictingKVCache.holding(keys, values, self.tokens, region))
        return caches

    def full_caches(self, region: int | None = None) -> list[EvictingKVCache]:
        """Every row back in memory, allocated as reading the document would allocate it."""
        caches = []
        for layer in range(len(self.tail.shapes)):
            keys, values = self.layer(layer, room=allocated_rows(self.tokens) - self.tokens)
            caches.append(EvictingKVCache.holding(keys, values, self.tokens, region, length=self.tokens))
        return caches

    def streamed(self, windows: list, keep: Keep | None = None) -> list["StreamedLayer"]:
        """The caches for one model call (see the module doc), each showing its layer's
        window (``attention.LayerWindow``) the queries."""
        self.store.touch()  # used now: what the least-recently-used limit goes by
        return [StreamedLayer(self, layer, window, keep) for layer, window in enumerate(windows)]

    def read(self, model, tokens: list[int], caches: list) -> mx.array:
        """Run ``tokens`` through ``model`` reading through ``caches`` (its layers' caches,
        :meth:`streamed` ones at the layers that compress), adding their rows to the
        tail; the logits of the last. An interrupted call takes its rows back out."""
        try:
            logits = model(mx.array([tokens]), cache=caches)[:, -1, :]
            mx.eval(logits)
        except OSError as error:
            self.tail.truncate()
            raise disk_error(self.tail.folder.parent.parent, error) from None
        except BaseException:
            self.tail.truncate()
            raise
        self.tail.advance(len(tokens))
        return logits

    def set_aside(self, others: dict[int, object]):
        """Write ``others`` (mlx-lm's caches of the layers that do not compress, by layer)
        as they stand where the rows on disk end, for :meth:`others_at_tail` (a model
        whose every layer compresses has none)."""
        if not others:
            return
        path = self.tail.folder / OTHERS
        try:
            write_caches(path.with_suffix(".new.safetensors"), others)
            os.replace(path.with_suffix(".new.safetensors"), path)  # whole, never half written
        except OSError as error:
            raise disk_error(self.tail.folder.parent.parent, error) from None

    def others_at_tail(self) -> dict[int, object]:
        """New caches as :meth:`set_aside` last wrote them (none before it did)."""
        path = self.tail.folder / OTHERS
        if not path.exists():
            return {}
        return read_caches(path)

    def close(self):
        """Remove the conversation's tail (the document's store stays)."""
        shutil.rmtree(self.tail.folder, ignore_errors=True)


def _read(sources: list, room: int = 0) -> tuple[mx.array, mx.array]:
    """The rows of ``sources`` (``(keys file, values file)`` pairs, or None) one after
    the other, in buffers with ``room`` rows free at the end."""
    sources = [pair for pair in sources if pair is not None and pair[0].rows]
    buffers = []
    for files in zip(*sources):  # the keys' files, then the values'
        rows = sum(f.rows for f in files)
        buffer = mx.zeros((1, files[0].heads, rows + room, files[0].dim), files[0].dtype)
        at = 0
        for file in files:
            buffer, at = file.copy_into(buffer, at), at + file.rows
        buffers.append(buffer)
    return buffers[0], buffers[1]


class StreamedLayer(_BaseCache):
    """One layer's full cache for one model call, read from disk (see the module doc)."""

    def __init__(self, full: DiskFullCache, layer: int, window, keep: Keep | None):
        self.full, self.layer, self.window, self.keep = full, layer, window, keep
        self.offset = full.tokens
        self._rows = None
        # mlx-lm's pipeline ties its send to the last layer's keys (``cache[-1].keys =
        # mx.depends(...)``); the rows here are on disk already, so this only takes the tie
        self.keys = mx.zeros((0,))

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        mx.eval(keys, values)  # the layers below are done, and their full rows freed
        self.full.tail.append_layer(self.layer, keys, values)
        all_keys, all_values = self.full.layer(self.layer, room=keys.shape[2])
        all_keys[..., self.offset :, :] = keys
        all_values[..., self.offset :, :] = values
        self.offset = all_keys.shape[2]
        self._rows = all_keys, all_values
        return all_keys, all_values

    def attended(self):
        """Once the layer's window holds the new queries: keep what the method selects."""
        if self.keep is not None:
            self.keep(self.layer, *self._rows)
        self._rows = None

    def make_mask(self, n: int, return_array: bool = False, window_size=None):
        if window_size is not None or return_array:
            return create_causal_mask(n, self.offset, window_size=window_size)
        return "causal" if n > 1 else None


def stored_full_cache(root: Path, key: str, notify: Callable[[str], None],
                      kv_bits: KVBits | None = None) -> DiskFullCache | None:
    """The stored document ``key`` under ``root`` (its rows packed by ``kv_bits``) if
    there is a sound one; a damaged one is removed, and that (or a folder that refuses
    the conversation's rows) is told."""
    try:
        store = open_store(root, key, kv_bits=kv_bits)
        return None if store is None else DiskFullCache(store, root / CONVERSATIONS)
    except StoreCorrupt as error:
        notify(f"{error}; reading the document again")
    except CKVError as error:
        notify(f"{error}; the full cache stays in memory meanwhile")
    return None
