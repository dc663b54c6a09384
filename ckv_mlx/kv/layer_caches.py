"""mlx-lm's own caches, kept for the layers that do not compress.

A sliding-window layer keeps mlx-lm's ``RotatingKVCache``, a linear-attention layer its
``ArraysCache`` state: the session reads through them as mlx-lm does and only copies,
counts, saves and (where mlx-lm can) trims them.
"""

from __future__ import annotations

import copy

import mlx.core as mx
from mlx_lm.models import cache as mlx_caches
from mlx_lm.models.cache import make_prompt_cache

from ..errors import CKVError
from ..model.families import compressible_layers


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


def copies(caches: dict[int, object]) -> dict[int, object]:
    """:func:`copied` of each of ``caches`` (by layer)."""
    return {layer: copied(cache) for layer, cache in caches.items()}


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


def to_saved(caches: dict[int, object], prefix: str = "others") -> tuple[dict[str, mx.array], list[dict]]:
    """mlx-lm's caches by layer as named arrays and a JSON-able layout (each one's class
    and its ``state``, with every array replaced by its name): what :func:`from_saved`
    reads back."""
    arrays: dict[str, mx.array] = {}
    layout = [{"layer": layer, "class": type(cache).__name__, "state": _encoded(cache.state, f"{prefix}.{layer}", arrays)}
              for layer, cache in caches.items()]
    return arrays, layout


# Module functions, not closures: a recursive closure is a reference cycle, which would keep
# every array it saw (a whole layer set's caches) alive until Python's cycle collector ran.
def _encoded(value, name: str, arrays: dict[str, mx.array]):
    """``value`` with each array put in ``arrays`` under a name and replaced by that name."""
    if isinstance(value, mx.array):
        arrays[name] = value
        return {"array": name}
    if isinstance(value, (list, tuple)):
        return [_encoded(v, f"{name}.{i}", arrays) for i, v in enumerate(value)]
    return value  # an int, or None


def _decoded(value, arrays: dict[str, mx.array]):
    """What :func:`_encoded` replaced, back from ``arrays``."""
    if isinstance(value, dict) and value.get("array") not in arrays:
        raise CKVError(f"the saved array {value.get('array')!r} of a layer's cache is missing: the file is damaged")
    if isinstance(value, dict):
        return arrays[value["array"]]
    return [_decoded(v, arrays) for v in value] if isinstance(value, list) else value


def from_saved(arrays: dict[str, mx.array], layout: list[dict]) -> dict[int, object]:
    """The caches :func:`to_saved` wrote; a layout naming no cache of mlx-lm's is refused."""
    caches = {}
    for entry in layout:
        kind = getattr(mlx_caches, entry["class"], None)
        if not (isinstance(kind, type) and issubclass(kind, mlx_caches._BaseCache)):
            raise CKVError(f"the saved layer {entry['layer']} holds an unknown cache {entry['class']!r}")
        caches[entry["layer"]] = kind.from_state(_decoded(entry["state"], arrays))
    return caches
