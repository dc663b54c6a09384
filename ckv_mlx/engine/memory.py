"""How much KV cache fits: sizes, the memory limit, and the plan for a bounded prefill.

A prompt whose full cache fits the KV limit is prefilled whole and compressed once. One
that does not is read in chunks that compress as they go, with a working budget chosen
so that working budget + one chunk of rows per layer stays under the limit.
"""

from __future__ import annotations

import re

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..kv.cache import allocated_rows
from ..errors import CKVError
from ..model.families import compressible_layers, one_token_caches

UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20,
         "mib": 2**20, "g": 2**30, "gb": 2**30, "gib": 2**30}
ACTIVATION_MARGIN = 0.25  # share of the memory budget left for activations by default
RECOMMENDED = "max_recommended_working_set_size"  # a Metal GPU's key in mx.device_info()


def parse_size(text: str) -> int:
    """Bytes in ``text``: ``512MiB``, ``2GB``, ``64m``, ``1048576`` (binary units)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in UNITS:
        raise CKVError(f"{text!r} is not a memory size: write e.g. 512MiB, 2GiB or a number of bytes")
    size = int(float(match.group(1)) * UNITS[match.group(2).lower()])
    if size <= 0:
        raise CKVError(f"memory size {text!r} must be more than 0")
    return size


def mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def weight_bytes(model: nn.Module) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def kv_bytes_per_token(model: nn.Module, probe: list | None = None) -> int:
    """Bytes one token adds to the full cache over the layers that compress (keys and
    values), in the dtype the model computes its keys in: one token read by mlx-lm
    (``probe``: :func:`~ckv_mlx.model.families.one_token_caches`, made if not given)."""
    caches = probe or one_token_caches(model)
    return sum((caches[i].keys.nbytes + caches[i].values.nbytes) // caches[i].keys.shape[2]
               for i in compressible_layers(model))


def memory_budget() -> int:
    """Bytes for weights, cache and activations: a Metal GPU's recommended working set
    (MLX's own limit there is 1.5x that, and going past it pages), else MLX's memory limit."""
    return int(mx.device_info().get(RECOMMENDED) or mx.get_memory_limit())


def default_kv_limit(model: nn.Module) -> int:
    """What :func:`memory_budget` leaves for the cache after a margin and the weights."""
    return int((1 - ACTIVATION_MARGIN) * memory_budget()) - weight_bytes(model)


def disk_read_step(query_heads: int, total_tokens: int, least: int) -> int:
    """Tokens per model call when reading against ``total_tokens`` rows streamed from
    disk (each call reads every layer's rows once): as many as one layer's attention
    scores (float32) fit in the activations' margin of :func:`memory_budget`, ``least``
    at the fewest."""
    margin = int(ACTIVATION_MARGIN * memory_budget())
    return max(least, margin // (4 * max(query_heads, 1) * max(total_tokens, 1)))


def working_budget(prompt_tokens: int, per_token: int, kv_limit: int, chunk: int, budget: int | None) -> int | None:
    """Tokens per layer to keep between chunks when the full cache of ``prompt_tokens``
    exceeds ``kv_limit``; None when it fits. Refuses a limit too small for ``budget``."""
    full = allocated_rows(prompt_tokens) * per_token  # what reading it whole allocates
    if full <= kv_limit:
        return None
    if budget is None:
        raise CKVError(
            f"the full cache of {prompt_tokens:,} tokens ({mib(full)}) exceeds the KV "
            f"memory limit ({mib(kv_limit)}) and method full keeps everything: choose a compressing method "
            "or raise the limit"
        )
    working = kv_limit // per_token - chunk
    if working < budget:
        raise CKVError(
            f"KV memory limit {mib(kv_limit)} is too small for budget {budget} with chunks of {chunk} tokens: "
            f"it needs at least {mib((budget + chunk) * per_token)}; raise the limit or lower the budget"
        )
    return working


def plan_prefill(loaded, prompt_tokens: int, budget: int | None, kv_limit: str | None,
                 chunk: int, ranks=None) -> tuple[int | None, str | None]:
    """The working budget for reading ``prompt_tokens`` with ``loaded`` (a
    :class:`~ckv_mlx.model.models.LoadedModel`) under ``kv_limit`` (a size; None:
    :func:`default_kv_limit`) and a note saying why, or ``(None, None)`` when it fits.
    A group (``ranks``) reads one way, each rank within its own limit: the least of them."""
    limit = parse_size(kv_limit) if kv_limit else default_kv_limit(loaded.model)
    per_token = loaded.kv_bytes_per_token
    working = working_budget(prompt_tokens, per_token, limit, chunk, budget)
    if ranks is not None and ranks.size > 1:
        bounded = [w for w in ranks.each(working or 0) if w]
        working = min(bounded) if bounded else None
    if working is None:
        return None, None
    return working, (
        f"the full cache of {prompt_tokens:,} tokens ({mib(allocated_rows(prompt_tokens) * per_token)}) would not fit the KV "
        f"memory limit ({mib(limit)}): reading it in chunks of {chunk} tokens that compress as they go, "
        f"keeping {working} tokens per layer between chunks"
    )
