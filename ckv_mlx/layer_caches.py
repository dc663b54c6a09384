"""mlx-lm's own caches, kept for the layers that do not compress.

A sliding-window layer keeps mlx-lm's ``RotatingKVCache``, a linear-attention layer its
``ArraysCache`` state: the session reads through them as mlx-lm does and only copies,
counts and (where mlx-lm can) trims them.
"""

from __future__ import annotations

import copy

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

from .families import compressible_layers


def fresh_others(model) -> dict[int, object]:
    """mlx-lm's empty cache of every layer that does not compress, by layer index."""
    keep = set(compressible_layers(model))
    return {i: cache for i, cache in enumerate(make_prompt_cache(model)) if i not in keep}


def copied(cache):
    """An independent copy of an mlx-lm cache: every array a new one, since mlx-lm
    writes some of them in place (a rotating window's slots)."""
    twin = copy.copy(cache)
    for name, value in vars(cache).items():
        if isinstance(value, mx.array):
            setattr(twin, name, mx.array(value))
        elif isinstance(value, list):
            setattr(twin, name, [mx.array(v) if isinstance(v, mx.array) else v for v in value])
    return twin


def arrays(cache) -> list[mx.array]:
    """The arrays an mlx-lm cache holds (to evaluate them)."""
    held = []
    for value in vars(cache).values():
        held += [v for v in (value if isinstance(value, list) else [value]) if isinstance(v, mx.array)]
    return held


def nbytes(cache) -> int:
    """Bytes an mlx-lm cache holds (an empty one: 0)."""
    return sum(a.nbytes for a in arrays(cache))


def all_trimmable(caches) -> bool:
    """Whether mlx-lm can take tokens back out of every one of ``caches``."""
    return all(c.is_trimmable() for c in caches)
