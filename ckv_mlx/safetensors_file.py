"""Writing safetensors files so that a full disk is an error. Given a path, MLX's
``save_safetensors`` drops a failed write without a word (tried on ``/dev/full``); given
a Python file, the failure reaches the caller as the ``OSError`` it is."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx

from .kv.layer_caches import from_saved, to_saved


def write_safetensors(path: str | Path, arrays: dict[str, mx.array], metadata: dict[str, str] | None = None):
    """``arrays`` (and ``metadata``) to ``path``; a failed write raises ``OSError``."""
    with open(path, "wb") as file:
        mx.save_safetensors(file, arrays, metadata or {})


def write_caches(path: str | Path, caches: dict[int, object]):
    """mlx-lm's caches by layer (:func:`~ckv_mlx.kv.layer_caches.to_saved`) to ``path``."""
    arrays, layout = to_saved(caches)
    write_safetensors(path, arrays, {"layout": json.dumps(layout)})


def read_caches(path: str | Path) -> dict[int, object]:
    """What :func:`write_caches` wrote."""
    arrays, metadata = mx.load(str(path), return_metadata=True)
    return from_saved(arrays, json.loads(metadata["layout"]))
