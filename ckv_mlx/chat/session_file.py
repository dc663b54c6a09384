"""The chat's session file (``.ckv``): the one owner of its format.

One safetensors file, written atomically (a temporary file, then a rename):

* ``cache.*``: the compressing layers' caches, as their mlx-lm ``state`` (arrays here,
  scalars in the metadata's ``cache_scalars``);
* ``window.N``: each compressing layer's remembered window queries;
* ``others.L.*``: mlx-lm's own caches of the layers that do not compress (their layout in
  the metadata's ``others``);
* with the conversation's full cache on disk, what selecting from it needs: ``selection.N``
  and ``selection-others.L.*`` (the last selection's window queries and other layers, laid
  out in ``full_cache.others``) and ``tail.NNN.keys`` / ``.values`` (the conversation's rows
  after the document's store, byte for byte); the store itself is referred to by name.

The metadata (JSON under ``ckv``) also carries what the chat was: model, document, its
hash, settings, turns and statistics. A file of another format, or of the layout before
mlx-lm 0.32's cache protocol, is refused in one line.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from ..errors import CKVError
from ..kv.cache import EvictingKVCache
from ..kv.layer_caches import from_saved, to_saved
from ..safetensors_file import write_safetensors

SESSION_FORMAT = "ckv-chat-session/2"  # 2: caches in mlx-lm 0.32's state layout
CACHE_SCALARS = "cache_scalars"


@dataclass
class OnDisk:
    """What a conversation whose full cache is on disk needs beside the caches."""

    store: str  # the document's store: its key ...
    store_dir: str  # ... under this root
    store_bits: dict | None
    unread: list[int]  # the last answer, not read against the full cache yet
    selection_queries: list[mx.array | None]  # each layer's window at the last selection
    selection_others: dict[int, object]  # mlx-lm's caches of the other layers at the disk's end
    tail_tokens: int
    tail: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)  # per layer: keys' and values' bytes


@dataclass
class SavedSession:
    """A chat as saved: the caches, window queries and other layers' caches, the chat's
    own metadata, and what its full cache on disk needs (None: in memory)."""

    metadata: dict
    caches: list[EvictingKVCache]
    window_queries: list[mx.array | None]
    others: dict[int, object]
    on_disk: OnDisk | None = None


def write(path: str | Path, saved: SavedSession) -> None:
    """Write ``saved`` to ``path``; a path that cannot be written is one line."""
    path = Path(path)
    flat = tree_flatten([c.state for c in saved.caches])
    arrays = {f"cache.{k}": v for k, v in flat if isinstance(v, mx.array)}
    arrays.update(_named("window", saved.window_queries))
    other_arrays, layout = to_saved(saved.others)
    arrays.update(other_arrays)
    meta = {**saved.metadata, "format": SESSION_FORMAT, "others": layout,
            CACHE_SCALARS: {k: v for k, v in flat if not isinstance(v, mx.array)}}
    if saved.on_disk is not None:
        disk = saved.on_disk
        selection_arrays, selection_layout = to_saved(disk.selection_others, "selection-others")
        arrays.update(selection_arrays)
        arrays.update(_named("selection", disk.selection_queries))
        for layer, pair in enumerate(disk.tail):
            arrays.update({f"tail.{layer:03d}.{part}": mx.array(b) for part, b in zip(("keys", "values"), pair)})
        meta["full_cache"] = {"store": disk.store, "store_dir": disk.store_dir, "store_bits": disk.store_bits,
                              "tail_tokens": disk.tail_tokens, "unread": disk.unread, "others": selection_layout}
    tmp = path.with_name(f".{path.name}.tmp.safetensors")
    try:
        write_safetensors(tmp, arrays, {"ckv": json.dumps(meta)})
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        tmp.unlink(missing_ok=True)
        raise CKVError(f"cannot write {path}: {e}; choose a writable path") from e


def read(path: str | Path) -> SavedSession:
    """What :func:`write` wrote; one-line errors for a missing, damaged or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise CKVError(f"{path}: no such session file; check the path")
    try:
        arrays, meta = mx.load(str(path), format="safetensors", return_metadata=True)
        info = json.loads(meta["ckv"])
    except (RuntimeError, ValueError, KeyError, OSError):
        raise CKVError(f"{path}: not a ckv-chat session (unreadable or damaged)") from None
    if info.get("format") != SESSION_FORMAT:
        raise CKVError(f"{path}: not a ckv-chat session (format {info.get('format')!r}, expected {SESSION_FORMAT})")
    if CACHE_SCALARS not in info:
        raise CKVError(f"{path}: saved by an older ckv-mlx, whose cache layout this one no longer reads; "
                       "open the document again")
    leaves = [(k[len("cache."):], v) for k, v in arrays.items() if k.startswith("cache.")]
    caches = [EvictingKVCache.from_state(s) for s in tree_unflatten(leaves + list(info.pop(CACHE_SCALARS).items()))]
    layers = len(caches)
    saved = SavedSession(info, caches, [arrays.get(f"window.{i}") for i in range(layers)],
                         from_saved(arrays, info.pop("others", [])))
    disk = info.pop("full_cache", None)
    if disk is not None and "tail_tokens" in disk:
        tail = [tuple(np.array(arrays[f"tail.{layer:03d}.{part}"]) for part in ("keys", "values"))
                for layer in range(layers)] if disk["tail_tokens"] else []
        saved.on_disk = OnDisk(disk["store"], disk["store_dir"], disk.get("store_bits"), list(disk["unread"]),
                               [arrays.get(f"selection.{i}") for i in range(layers)],
                               from_saved(arrays, disk.get("others", [])), disk["tail_tokens"], tail)
    elif disk is not None:
        info["full_cache"] = disk  # referred to in an older layout: the reader reads the document again
    return saved


def _named(prefix: str, arrays: list[mx.array | None]) -> dict[str, mx.array]:
    return {f"{prefix}.{i}": a for i, a in enumerate(arrays) if a is not None}
