"""Several questions about one document: the multi-turn policies.

* ``first-question`` (the paper): compress with the first question in the window and
  drop the full cache; follow-ups go through the bounded region with re-scoring.
* ``agnostic``: compress right after the document, before any question.
* ``per-question``: keep the full cache of document and conversation, and select afresh
  from all of it for each question (best answers). The full cache is either on disk (a
  :class:`~ckv_mlx.disk.disk_cache.DiskFullCache`: memory holds only the selection) or in
  memory (a compressed copy is made for each question).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import mlx.core as mx

from ..kv.attention import joined
from ..disk.disk_cache import DiskFullCache
from ..errors import CKVError
from ..kv.layer_caches import nbytes
from .session import Session

POLICIES = ("first-question", "agnostic", "per-question")


@dataclass(frozen=True)
class KeptCache:
    """What a session's cache keeps: bytes allocated, tokens per layer, compressed or not."""

    kv_bytes: int
    layer_tokens: list[int]
    compressed: bool

    @classmethod
    def of(cls, session: Session) -> "KeptCache":
        return cls(session.kv_bytes, [c.length for c in session.caches], session.compressed)


class Conversation:
    """Turns over one prefilled document in ``session``, under ``policy`` and ``budget``;
    ``per-question`` selects from ``full_on_disk`` when given."""

    def __init__(self, session: Session, policy: str, budget: int | None, full_on_disk: DiskFullCache | None = None):
        if policy not in POLICIES:
            raise CKVError(f"unknown policy {policy!r}: choose one of {', '.join(POLICIES)}")
        self.session, self.policy, self.budget = session, policy, budget
        self.full_on_disk = full_on_disk if policy == "per-question" else None
        self.turns = 0
        self._full = None
        self._answer_start = 0
        self._unread: list[int] = []  # on disk: the last answer, read with the next question
        self._queries: list | None = None  # on disk: the window queries of the last selection
        self.last_answer: KeptCache | None = None  # in memory: the copy the last answer used
        self.kv_ram_bytes = 0  # KV in memory for the last question: selection + full cache set aside (+ one layer read)

    @property
    def held_bytes(self) -> int:
        """Bytes set aside in memory beside the session's caches: the full cache while a
        ``per-question`` answer runs (on disk, nothing: what it sets aside is there)."""
        if self._full:
            return sum(c.nbytes for c in self._full.caches) + sum(nbytes(c) for c in self._full.others.values())
        return 0

    @property
    def disk_bytes(self) -> int:
        """Bytes of the full cache on disk (0 when it is in memory)."""
        return self.full_on_disk.nbytes if self.full_on_disk else 0

    def open(self, document: tuple | None = None):
        """Start from a prefilled document: a :meth:`Session.snapshot`, or with the full
        cache on disk the session as it is (its rows are dropped from memory)."""
        self.turns = 0
        if self.full_on_disk is not None:
            self.session.forget_rows()
            self._queries = [a.window_state() for a in self.session.attentions]
            self.full_on_disk.set_aside(self.session.others)
            return
        self.session.restore(document)
        if self.policy == "agnostic":
            self.session.compress(self.budget)

    def start(self, question: list[int]) -> mx.array:
        """Feed a question and compress as the policy says; the logits of its last token."""
        session = self.session
        if self.full_on_disk is not None:
            logits = self._select_from_disk(question)
        else:
            logits = session.feed(question)
        if self.policy == "per-question" and self.full_on_disk is None:
            self._full = session.snapshot()
            session.compress(self.budget)
        elif self.policy == "first-question" and self.turns == 0:
            session.compress(self.budget)
        self.turns += 1
        self.kv_ram_bytes = session.kv_bytes + self.held_bytes + (self.full_on_disk.layer_bytes if self.full_on_disk else 0)
        self._answer_start = session.position
        session.stats.generated_tokens, session.stats.decode_s = 0, 0.0  # decode figures are this answer's
        return logits

    def replay(self, turns: list[tuple[list[int], list[int]]]):
        """Put earlier turns (question and answer tokens) back, as asking them did. On
        disk they are read with the next question, whose selection reads them against
        every row anyway: one read, not one selection per turn."""
        if self.full_on_disk is not None:
            self._unread = [token for question, answer in turns for token in (*question, *answer)]
            self.turns = len(turns)
            return
        for question, answer in turns:
            self.start(question)
            self.finish(answer)

    def _select_from_disk(self, question: list[int]) -> mx.array:
        """The last answer and ``question`` read against the full cache on disk, each
        layer keeping its share of the budget; the window is what it was after the last
        selection, as if the answer had been read into the full cache (as in memory)."""
        for attention, queries in zip(self.session.attentions, self._queries):
            attention.restore_window_state(queries)
        self.session.forget_rows()  # the last selection goes first: it is all on disk
        self.session.others = self.full_on_disk.others_at_tail()  # back to where the disk ends
        with self.session.taken_back_on_failure(self.full_on_disk):  # a failed write takes the question back
            logits = self.session.reselect(self._unread + question, self.full_on_disk, self.budget)
            self.full_on_disk.set_aside(self.session.others)
        self._unread = []
        self._queries = [a.window_state() for a in self.session.attentions]
        return logits

    def disk_state(self) -> tuple[list[int], list[mx.array | None], dict[int, object]]:
        """What selecting from disk needs beyond the caches, to save: the last answer
        not read yet, each layer's window queries at the last selection, and mlx-lm's
        caches of the other layers where the disk ends."""
        return self._unread, [joined(state) for state in self._queries], self.full_on_disk.others_at_tail()

    def resume_disk_state(self, unread: list[int], queries: list[mx.array | None], others: dict[int, object]):
        """Go on from what :meth:`disk_state` gave."""
        self._unread, self._queries = list(unread), queries
        self.full_on_disk.set_aside(others)

    def finish(self, answer: list[int]):
        """Make sure the whole answer is in the cache that the next question builds on:
        ``per-question`` goes back to its full cache and adds the answer there (on disk:
        with the next question), keeping the answer's statistics and, in memory, a
        record of the compressed copy it used."""
        session = self.session
        fed = session.position - self._answer_start
        if self.full_on_disk is not None:
            self._unread = answer  # the selection the next question makes reads it against every row
        elif self.policy == "per-question" and self._full is not None:
            self.last_answer = KeptCache.of(session)
            stats = session.stats
            session.restore(self._full)
            session.stats = stats  # the snapshot's stats predate the compression and the answer
            self._full, fed = None, 0
        if answer[fed:]:
            session.feed(answer[fed:])

    def ask(
        self,
        question: list[int],
        max_tokens: int,
        should_stop: Callable[[], bool] = lambda: False,
        repetition_penalty: float | None = None,
    ) -> Iterator[int]:
        """Stream the answer's tokens; stopping early still leaves a consistent state."""
        logits = self.start(question)
        answer: list[int] = []
        tokens = self.session.generate(logits, max_tokens, should_stop=should_stop, repetition_penalty=repetition_penalty)
        try:
            for token in tokens:
                answer.append(token)
                yield token
        finally:
            self.finish(answer)


def answer_line(tokens: Iterator[int], tokenizer, max_tokens: int) -> list[int]:
    """Take tokens up to ``max_tokens`` or the end of the answer's first line."""
    taken: list[int] = []
    try:
        for token in tokens:
            taken.append(token)
            if len(taken) >= max_tokens or "\n" in tokenizer.decode(taken).lstrip():
                break
    finally:
        getattr(tokens, "close", lambda: None)()
    return taken
