"""The processes ``mlx.launch`` started for one run, and everything they say to each other
outside the model's own calls.

Rank 0 reads the document, prints, serves HTTP and runs the UI; the other ranks do the
same model work on what rank 0 shares with them. Every call here is collective: every
rank makes it, in the same order, or the group waits. One process is a group of one, and
every call is then free (no communication).
"""

from __future__ import annotations

import json
import os
from contextlib import redirect_stderr, redirect_stdout
from typing import Callable

import mlx.core as mx
import numpy as np

from ..errors import CKVError


class Ranks:
    """The group of processes running one model (a group of one outside ``mlx.launch``)."""

    def __init__(self, group: mx.distributed.Group | None = None):
        self.group = group or mx.distributed.init()

    @property
    def rank(self) -> int:
        return self.group.rank()

    @property
    def size(self) -> int:
        return self.group.size()

    @property
    def leader(self) -> bool:
        """Whether this is rank 0: the one that reads, prints and serves."""
        return self.rank == 0

    def _sum(self, x: mx.array) -> mx.array:
        """``x`` summed over the ranks, evaluated. Work already queued (a generation step
        evaluating ahead, with the model's own collectives) finishes first, so every rank
        runs its collectives in the same order."""
        mx.synchronize()
        mx.eval(x)
        out = mx.distributed.all_sum(x, group=self.group, stream=mx.cpu)
        mx.eval(out)
        return out

    def share(self, value):
        """Rank 0's ``value`` (anything JSON can hold) on every rank."""
        if self.size == 1:
            return value
        data = json.dumps(value).encode() if self.leader else b""
        size = self.total(len(data))
        mine = mx.array(np.frombuffer(data, np.uint8)) if self.leader else mx.zeros(size, mx.uint8)
        return json.loads(bytes(np.array(self._sum(mine))))

    def send(self, work) -> None:
        """Rank 0: tell the other ranks the work it starts now (anything JSON can hold),
        or with None that it is done; the others run it in :meth:`follow`."""
        if self.size > 1 and self.leader:
            self.share(work)

    def follow(self, run: Callable[[object], None], ignore: tuple[type[BaseException], ...] = ()) -> None:
        """A rank other than 0: ``run`` each work rank 0 :meth:`send` s, in its order, until
        it sends None (an exception in ``ignore`` ends that work only)."""
        while (work := self.share(None)) is not None:
            try:
                run(work)
            except ignore:
                pass

    def each(self, value: int) -> list[int]:
        """Every rank's ``value``, in rank order."""
        if self.size == 1:
            return [value]
        mine = np.zeros(self.size, np.int64)
        mine[self.rank] = value
        return [int(v) for v in np.array(self._sum(mx.array(mine)))]

    def total(self, value: int) -> int:
        """The sum of every rank's ``value``."""
        return sum(self.each(value))

    def least(self, value: int) -> int:
        """The smallest of every rank's ``value`` (what a plan all ranks follow must use)."""
        return min(self.each(value))

    def all(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every rank."""
        return self.least(int(flag)) == 1

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` holds on some rank (e.g. rank 0 was asked to stop)."""
        return flag if self.size == 1 else self.total(int(flag)) > 0

    def share_result(self, produce: Callable[[], object]):
        """What ``produce()`` returns on rank 0 (which alone runs it: reading its files),
        on every rank; its one-line error (:class:`CKVError`) raised on every rank."""
        if self.size == 1:
            return produce()
        outcome = None
        if self.leader:
            try:
                outcome = {"value": produce()}
            except CKVError as error:
                outcome = {"error": str(error)}
        outcome = self.share(outcome)
        if "error" in outcome:
            raise CKVError(outcome["error"])
        return outcome["value"]

    def rows(self, mine: mx.array | None, at: list[int], total: int, width: int) -> mx.array:
        """A ``[total, width]`` float32 array equal on every rank, each rank giving its rows
        ``mine`` (``[len(at), width]``, or None for none) at row numbers ``at``: a
        gather that is exact (every other rank adds zeros)."""
        whole = mx.zeros((total, width), mx.float32)
        if at:
            whole[mx.array(at)] = mine.astype(mx.float32)
        return whole if self.size == 1 else self._sum(whole)


def as_rank(ranks: Ranks, command: Callable[[], int | None]) -> int | None:
    """Run ``command`` as this rank: rank 0 prints, the others print nothing but the error
    that ends them; another rank gone (MLX's ring lost a peer) is one line, not a trace."""
    try:
        if ranks.leader:
            return command()
        with open(os.devnull, "w") as sink, redirect_stdout(sink), redirect_stderr(sink):
            return command()
    except RuntimeError as error:
        if not str(error).startswith("[ring]"):
            raise
        raise CKVError(f"rank {ranks.rank}: another process of the group stopped ({error}), so this one stops too; "
                       "see that rank's output for why") from None
