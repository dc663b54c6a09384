"""The statistics of a session: what one prefill, compression and generation cost and
kept (:class:`Stats`), and the one definition of the bytes it reports: allocated now,
of them holding tokens, and what a full cache of the same tokens allocates."""

from __future__ import annotations

from dataclasses import dataclass

from ..kv.cache import allocated_rows
from ..kv.layer_caches import nbytes

@dataclass
class Stats:
    """What one prefill, compression and generation cost and kept."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    kv_bytes_full: int = 0  # allocated by a full cache of the prompt (as read when it was selected)
    kv_bytes_kept: int = 0  # allocated right after compression
    kv_rows_kept: int = 0  # of which rows holding tokens
    layer_budgets: list[int] | None = None
    prefill_s: float = 0.0
    compress_s: float = 0.0
    decode_s: float = 0.0
    peak_memory_bytes: int = 0
    peak_kv_bytes: int = 0
    working_budget: int | None = None
    reselect_s: float = 0.0  # the last re-selection from the full cache on disk
    disk_bytes: int = 0  # the full cache on disk, when it is there
    store_reused: bool = False  # the document's stored cache was used: nothing read

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tps(self) -> float:
        return self.generated_tokens / self.decode_s if self.decode_s else 0.0



class Accounting:
    """The session's byte figures (a part of :class:`~ckv_mlx.engine.session.Session`)."""

    @property
    def kv_bytes(self) -> int:
        """KV bytes allocated now, over all layers (mlx-lm's own caches included)."""
        return sum(c.nbytes for c in self.caches) + sum(nbytes(c) for c in self.others.values())

    @property
    def kv_rows_bytes(self) -> int:
        """KV bytes of the rows holding tokens (at most :attr:`kv_bytes`)."""
        return sum(c.rows_nbytes for c in self.caches) + sum(nbytes(c) for c in self.others.values())

    @property
    def full_bytes(self) -> int:
        """What a full cache of every token seen so far allocates (256-row steps), beside
        what the layers that do not compress hold."""
        return self.bytes_per_token * allocated_rows(self.position) + sum(nbytes(c) for c in self.others.values())

    @property
    def bytes_per_token(self) -> int:
        """What one more token costs a full cache, over the layers that compress."""
        return sum(c.row_bytes for c in self.caches)
