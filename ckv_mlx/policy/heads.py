"""Which heads of a layer one process scores: all of them, or under tensor parallelism
one rank's slice of the query and KV heads (mlx-lm shards them in order, an equal part
per rank). The rows of per-head scores a method needs from other ranks come through
``gather`` (``ckv_mlx.group.ranks.Ranks.rows``): equal on every rank, exactly."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import mlx.core as mx

Gather = Callable[[mx.array | None, list[int], int, int], mx.array]


@dataclass(frozen=True)
class HeadSlice:
    """Query heads ``first_query ...`` and KV heads ``first_kv ...`` of ``total_kv``, as
    many as the layer's window queries and keys hold here."""

    first_query: int
    first_kv: int
    total_kv: int
    gather: Gather

    def held(self, heads: list[int], query_heads: int) -> list[int]:
        """Which of the (global) query ``heads`` are held here, as positions in ``heads``."""
        return [i for i, h in enumerate(heads) if self.first_query <= h < self.first_query + query_heads]

    def kv_rows(self, kv_heads: int) -> list[int]:
        """The global numbers of the ``kv_heads`` KV heads held here."""
        return list(range(self.first_kv, self.first_kv + kv_heads))
