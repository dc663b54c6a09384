"""Prefill once, compress many: every (mode, method, budget) of a sample from one prefill.

Query-aware mode compresses with the question in the observation window (the paper's
setting, policy ``first-question``); query-agnostic compresses right after the document
(policy ``agnostic``). Fidelity teacher-forces the full cache's answer through each
compressed cache: top-1 agreement and mean KL(full || method) per answer token.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import mlx.core as mx

from ..kv.attention import joined
from ..policy.budgets import parse_budget
from ..engine.conversation import POLICIES, Conversation, answer_line
from ..disk.disk_cache import DiskFullCache
from ..engine.reselection import read_or_reuse
from ..policy.methods import Method
from ..kv.quantized import KVBits
from ..engine.session import PREFILL_STEP, Session, Snapshot
from ..disk.store import CONVERSATIONS, Store, StoreWriter, document_key
from .tasks import EvalSample

MODES = {"query-aware": "first-question", "query-agnostic": "agnostic"}
DISK_POLICY = "per-question-disk"  # per-question with the full cache on disk
FOLLOWUP_POLICIES = (*POLICIES, DISK_POLICY)


@dataclass(frozen=True)
class Setting:
    """One way to answer: a method at a budget ("64", "5%"; None for full), its kept
    rows quantized by ``kv_bits`` (None: as computed)."""

    method: Method
    budget: str | None
    kv_bits: KVBits | None = None

    def key(self, mode: str) -> str:
        """Where a record sits in the grid: mode (or policy), method, budget, bits."""
        bits = f"/{self.kv_bits.bits}bit-g{self.kv_bits.group_size}" if self.kv_bits else ""
        return f"{mode}/{self.method.name}/{self.budget or 'full'}{bits}"


def _fidelity(lp: mx.array, full_lp: mx.array) -> tuple[float, float]:
    top1 = mx.mean(mx.argmax(lp, axis=-1) == mx.argmax(full_lp, axis=-1)).item()
    kl = mx.mean(mx.sum(mx.exp(full_lp) * (full_lp - lp), axis=-1)).item()
    return top1, max(kl, 0.0)


class Harness:
    """Runs samples through one session; yields one record per answer."""

    def __init__(self, session: Session, tokenizer, max_tokens: int, fidelity: bool = True, answers: bool = True,
                 working_budget: int | None = None, chunk: int = PREFILL_STEP, chunk_question: bool = True,
                 stores: Path | None = None, identity: str = "", notify=lambda text: None):
        self.session, self.tokenizer = session, tokenizer
        self.max_tokens, self.fidelity = max_tokens, fidelity
        self.answers = answers  # False: compressed settings are scored by fidelity alone, their answers not generated
        self.working_budget, self.chunk, self.chunk_question = working_budget, chunk, chunk_question
        self.stores, self.identity, self.notify = stores, identity, notify  # documents' full caches on disk

    def _answer(self, logits, sample: EvalSample) -> list[int]:
        limit = sample.max_tokens or self.max_tokens
        if sample.whole_answer:
            return list(self.session.generate(logits, limit))
        return answer_line(self.session.generate(logits, limit), self.tokenizer, limit)

    def _record(self, sample: EvalSample, setting: Setting, answer: list[int], scorer, **extra) -> dict:
        text = self.tokenizer.decode(answer)
        return {
            "task": sample.task, "sample": sample.key, "length": sample.length,
            "prompt_tokens": len(sample.document) + len(sample.questions[0]), "depth": sample.depth,
            "method": setting.method.name, "budget": setting.budget, "answer": text,
            "kv_bits": setting.kv_bits.bits if setting.kv_bits else None,
            "policy": None, "turn": 1, "top1": None, "kl": None, **sample.info, **scorer(text), **extra,
        }

    def _prefill(self, sample: EvalSample) -> tuple[tuple, Store | None]:
        """Read the sample's document once (or take its stored full cache from disk): the
        snapshot every setting starts from, and the store that holds it (None without
        stores, or when the disk refused)."""
        session = self.session
        session.reset()
        if self.stores is None:
            session.feed(sample.document)
            return session.snapshot(), None
        widest = session.attentions[0].kept
        key = document_key(self.identity, sample.document)
        full = read_or_reuse(session, self.stores, key, f"{sample.key}'s document",
                             lambda writer: session.prefill(sample.document, store=writer), self.notify,
                             tokens=sample.document)
        if full is not None and not session.caches[0].length:  # stored: every row back from disk
            if session.attentions[0].queries_held < min(widest, len(sample.document)):
                self.notify(f"{sample.key}: its stored window queries are too few for these methods: reading it")
                session.reset()
                session.feed(sample.document)
            else:
                session.caches = full.full_caches(session.region)
        if full is None:
            return session.snapshot(), None
        full.close()
        return session.snapshot(), full.store

    def _bounded_prefill(self, sample: EvalSample, method: Method, question: list[int] | None) -> tuple:
        """The document read in chunks that ``method`` compresses to the working budget
        as they go, each scored by ``question`` if given: the snapshot all of that
        method's budgets start from."""
        self.session.reset()
        self.session.method = method
        self.session.prefill(sample.document, working_budget=self.working_budget, chunk=self.chunk, question=question)
        return self.session.snapshot()

    def _start(self, sample: EvalSample, setting: Setting, mode: str, document: tuple, bounded: dict) -> tuple:
        """Where ``setting`` starts: the full document, or its method's bounded prefill
        (query-aware: scored by the question when ``chunk_question``)."""
        if self.working_budget is None or not setting.method.compresses:
            return document
        question = sample.questions[0] if self._scored_by_question(mode) else None
        key = (setting.method.name, question is not None)
        if key not in bounded:
            bounded[key] = self._bounded_prefill(sample, setting.method, question)
        return bounded[key]

    def _scored_by_question(self, mode: str) -> bool:
        """Whether a bounded prefill in ``mode`` is scored by the question (known up front)."""
        return self.chunk_question and mode == "query-aware"

    def _budget(self, sample: EvalSample, setting: Setting) -> int | None:
        if not setting.method.compresses:
            return None
        return parse_budget(setting.budget, len(sample.document) + len(sample.questions[0]))

    def run(self, sample: EvalSample, settings: list[Setting], modes: list[str], done: set[str]) -> Iterator[dict]:
        """Single-question records for every mode and setting not in ``done``."""
        todo = [(mode, s) for mode in modes for s in settings if f"{sample.key}/{s.key(mode)}" not in done]
        if not todo:
            return
        self.session.keep_queries_for([s.method for s in settings])
        (document, _), bounded = self._prefill(sample), {}
        full = next(s for s in settings if not s.method.compresses)
        reference = self._full_answer(document, full, sample)
        for mode, setting in todo:
            yield self._single(sample, self._start(sample, setting, mode, document, bounded), setting, mode, reference)

    def _full_answer(self, document, full: Setting, sample: EvalSample) -> tuple:
        session = self.session
        session.method, session.kv_bits = full.method, None
        conversation = Conversation(session, "first-question", None)
        conversation.open(document)
        logits = conversation.start(sample.questions[0])
        full_bytes, state = session.kv_bytes, session.snapshot()
        answer = self._answer(logits, sample)
        session.restore(state)
        teacher = session.teacher_force(logits, answer) if self.fidelity and answer else None
        return answer, teacher, full_bytes

    def _single(self, sample, document, setting: Setting, mode: str, reference) -> dict:
        session = self.session
        full_answer, full_lp, full_bytes = reference
        budget = self._budget(sample, setting)
        session.method, session.kv_bits = setting.method, setting.kv_bits
        conversation = Conversation(session, MODES[mode], budget)
        conversation.open(document)
        logits = conversation.start(sample.questions[0])
        kept = session.kv_bytes
        state = session.snapshot() if self.fidelity else None
        answer = self._answer(logits, sample) if self.answers or not setting.method.compresses else []
        extra = {"mode": mode, "key": f"{sample.key}/{setting.key(mode)}", "budget_tokens": budget,
                 "kv_fraction": kept / full_bytes, "kv_bytes": kept}
        if self.working_budget and setting.method.compresses:
            extra["working_budget"] = self.working_budget
            extra["chunk_scoring"] = "question" if self._scored_by_question(mode) else "window"
        if full_lp is not None and setting.method.compresses:
            session.restore(state)
            extra["top1"], extra["kl"] = _fidelity(session.teacher_force(logits, full_answer), full_lp)
        return self._record(sample, setting, answer, sample.scorers[0], **extra)

    def followups(self, sample: EvalSample, settings: list[Setting], policies: list[str], done: set[str]) -> Iterator[dict]:
        """Both turns of a follow-up sample under every policy and setting not in ``done``."""
        session = self.session
        todo = [(p, s) for p in policies for s in settings if f"{sample.key}/{s.key(p)}/turn1" not in done]
        if not todo:
            return
        session.keep_queries_for([s.method for s in settings])
        document, store = self._prefill(sample)
        with tempfile.TemporaryDirectory(prefix="ckv-eval-") as root:
            if store is None and DISK_POLICY in policies:  # no stores kept: one for this sample alone
                store = _stored(document, Path(root))
            for policy, setting in todo:
                key = f"{sample.key}/{setting.key(policy)}"
                budget = self._budget(sample, setting)
                session.method, session.kv_bits = setting.method, setting.kv_bits
                conversation = self._conversation(policy, budget, document, store, Path(root))
                for turn, (question, scorer) in enumerate(zip(sample.questions, sample.scorers), 1):
                    answer = answer_line(conversation.ask(question, self.max_tokens), self.tokenizer, self.max_tokens)
                    yield self._record(sample, setting, answer, scorer, mode="query-aware", policy=policy,
                                       turn=turn, key=f"{key}/turn{turn}", budget_tokens=budget,
                                       kv_fraction=session.kv_bytes / session.full_bytes,
                                       kv_ram_bytes=conversation.kv_ram_bytes)
                if conversation.full_on_disk is not None:
                    conversation.full_on_disk.close()

    def _conversation(self, policy: str, budget, document: tuple, store, root: Path) -> Conversation:
        """A conversation over the prefilled ``document``; ``per-question-disk`` selects
        from its ``store`` on disk (the in-memory rows are dropped)."""
        if policy != DISK_POLICY:
            conversation = Conversation(self.session, policy, budget)
            conversation.open(document)
            return conversation
        self.session.restore(document)
        conversation = Conversation(self.session, "per-question", budget, DiskFullCache(store, root / CONVERSATIONS))
        conversation.open()
        return conversation


def _stored(document: Snapshot, root: Path):
    """The prefilled ``document`` written to a store under ``root``."""
    writer = StoreWriter(root, "document", len(document.caches))
    writer.append(document.caches, document.caches[0].length)
    return writer.publish([joined(state) for state in document.queries])
