"""The chat engine: one model, one document, one conversation, all MLX work on one thread.

Every public method only queues a job (jobs run in order on the engine's thread) and
returns at once; results come back as :mod:`.events` through ``emit``, which is called
on the engine's thread. :meth:`ChatEngine.stop` is the exception: it takes effect at
the next generated token.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import mlx.core as mx

from ..policy.budgets import parse_budget
from ..engine.conversation import Conversation, KeptCache
from ..text.documents import document_hash, read_document
from ..errors import CKVError
from ..model.gguf import cache_dir
from ..disk.disk_cache import DiskFullCache, stored_full_cache
from ..engine.reselection import read_or_reuse
from ..engine.memory import parse_size, plan_prefill
from ..policy.methods import make_method
from ..model.models import LoadedModel, load_model
from ..profiles import resolve_profile
from ..kv.quantized import AS_COMPUTED, AS_COMPUTED_NOTE, KVBits, kv_bits_setting, store_bits_setting
from ..engine.runtime import Cancelled, MLXThread
from ..group.ranks import Ranks
from ..text.prompts import TRUNCATE_CHOICES, cut_to_fit, document_prefix, question_tokens
from ..engine.session import PREFILL_STEP, Session
from ..disk.store import DEFAULT_LIMIT_BYTES, StoreWriter, document_key, store_root
from . import session_file
from .session_file import OnDisk, SavedSession
from .events import (
    Answering, CacheView, ChatSettings, Chunk, DocumentReady, Failure, Notice, Progress, Reply, Resumed,
    Saved, Status,
)

VIEW_INTERVAL_S = 0.2
LOG_NAME = "ckv-chat.log"

_log = logging.getLogger(__name__)


def log_path() -> Path:
    """Where ckv-chat logs library warnings and the tracebacks of internal errors."""
    return cache_dir() / LOG_NAME


@contextmanager
def quiet_libraries(path: Path):
    """While the block runs (Textual owns the terminal), send log records and warnings to
    ``path``: transformers and huggingface_hub log through handlers bound to the terminal
    when they were imported (e.g. "Token indices sequence length is longer than ...")."""
    path.parent.mkdir(parents=True, exist_ok=True)
    log = logging.FileHandler(path, encoding="utf-8")
    log.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    loggers = [root, *(x for x in logging.Logger.manager.loggerDict.values() if isinstance(x, logging.Logger))]
    saved = [(logger, logger.handlers, logger.propagate) for logger in loggers]
    for logger in loggers:
        if any(map(_to_terminal, logger.handlers)):
            logger.handlers = [h for h in logger.handlers if not _to_terminal(h)]
            logger.propagate = True
    root.addHandler(log)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _log_warning
            yield
    finally:
        for logger, handlers, propagate in saved:
            logger.handlers, logger.propagate = handlers, propagate
        log.close()


def _to_terminal(handler: logging.Handler) -> bool:
    streams = (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)
    return isinstance(handler, logging.StreamHandler) and handler.stream in streams


def _log_warning(message, category, filename, lineno, file=None, line=None):
    logging.getLogger("py.warnings").warning(warnings.formatwarning(message, category, filename, lineno, line).rstrip())


@dataclass
class _Turn:
    question: str
    answer: str
    question_tokens: list[int]
    answer_tokens: list[int]


@dataclass
class _Document:
    path: Path
    text: str  # what the prompts hold: the file's text, or under --truncate what was kept of it
    prefix: list[int]
    digest: str  # of the file's text
    turns: list[_Turn] = field(default_factory=list)

    @property
    def pairs(self) -> list[tuple[str, str]]:
        return [(t.question, t.answer) for t in self.turns]

    @property
    def conversation_tokens(self) -> int:
        """Tokens of the turns after the document: questions and answers."""
        return sum(len(t.question_tokens) + len(t.answer_tokens) for t in self.turns)


def conversation_room(settings: ChatSettings, context: int) -> int:
    """Tokens a document cut to fit leaves for the conversation: the setting, else a
    quarter of the context."""
    return context // 4 if settings.conversation_room is None else settings.conversation_room


def _count(n: int, thing: str) -> str:
    return f"{n:,} {thing}{'' if n == 1 else 's'}"


def _restarted(tokenizer, document: _Document, turns: list[_Turn]) -> list[_Turn]:
    """``turns`` as the conversation's first ones: the first question's tokens made
    again to follow the document rather than an answer now dropped."""
    if not turns:
        return turns
    first = question_tokens(tokenizer, document.text, document.prefix, [], turns[0].question)
    return [replace(turns[0], question_tokens=first), *turns[1:]]


class ChatEngine:
    """Chat about documents with a compressed KV cache; see the module doc."""

    def __init__(self, settings: ChatSettings, emit: Callable[[object], None],
                 loader: Callable[..., LoadedModel] = load_model, ranks: Ranks | None = None):
        self.settings = settings
        self._ranks = ranks or Ranks()  # under mlx.launch rank 0's jobs are run by every rank (follow)
        self._group_bytes: dict[str, int] = {}  # the group's byte figures at the last point every rank reached
        self._emit, self._loader = emit, loader
        self._stop, self._closing = threading.Event(), threading.Event()
        self._loaded: LoadedModel | None = None
        self._session: Session | None = None
        self._profile = None
        self._profile_name: str | None = None
        self._document: _Document | None = None
        self._conversation: Conversation | None = None
        self._pending: ChatSettings | None = None
        self._refused: Path | None = None  # the last document refused for its length
        self._phase = "idle"
        self._last_view = 0.0
        self._mlx = MLXThread("ckv-engine", on_exit=self._end)

    # The interface the app drives (any thread).

    def open(self, path: str | Path):
        """Read a document and prefill it; the conversation starts anew."""
        self._submit(self._open, str(path))

    def ask(self, question: str):
        self._submit(self._ask, question)

    def stop(self):
        """Stop the answer being generated; what was said stays in the cache."""
        self._stop.set()

    def set_budget(self, budget: str):
        self._submit(self._change, {"budget": budget})

    def set_method(self, method: str):
        self._submit(self._change, {"method": method})

    def truncate(self, where: str, room: int | None = None):
        """How to fit a document over the context: cut at ``where`` (start, middle, end),
        leaving ``room`` tokens for the conversation (None: as set), or refuse (none); a
        document just refused for its length is opened again."""
        self._submit(self._truncate, where, room)

    def context(self):
        """Say where the context's tokens go: the document, the turns, the answer's room."""
        self._submit(self._context)

    def reread(self):
        """Prefill the document and conversation again, with the current settings."""
        self._submit(self._reread)

    def save(self, path: str | Path):
        self._submit(self._save, str(path))

    def resume(self, path: str | Path):
        self._submit(self._resume, str(path))

    def close(self, timeout: float = 10.0):
        """Stop what runs (between prefill chunks, or tokens), drop what waits, end the thread."""
        self._closing.set()
        self._stop.set()
        self._mlx.close(cancel=True, timeout=timeout)

    def follow(self):
        """A rank other than 0 under ``mlx.launch``: run rank 0's jobs as they come, in
        its order, on this thread, until rank 0's engine ends."""
        self._ranks.follow(lambda job: self._run(getattr(self, job[0]), job[1]), ignore=(Cancelled,))
        self.close()

    # The engine's thread.

    def _submit(self, job, *args):
        self._mlx.submit(lambda _: self._run(job, args))

    def _end(self):
        """The thread's last work: the conversation dropped, the other ranks told to stop."""
        self._end_conversation()
        self._ranks.send(None)

    def _run(self, job, args):
        """Run one job (every rank of a group runs it: rank 0 sends it first), reporting
        its failure (a cancelled one, the engine closing, ends quietly)."""
        self._ranks.send([job.__name__, list(args)])
        try:
            job(*args)
        except CKVError as error:
            self._emit(Failure(str(error)))
        except Cancelled:
            raise
        except Exception as error:  # a bug must not take the app down with it
            _log.exception("internal error")  # under the app, into the log file, not onto the screen
            self._emit(Failure(f"internal error ({error.__class__.__name__}: {error}); please report it "
                               f"with the traceback from {log_path()}"))
        self._phase = "idle"
        if self._session is not None and not self._ranks.any(self._closing.is_set()):
            self._emit(self._view(every_rank=True))

    def _ensure_model(self, name: str | None):
        """Load ``name`` (None: the built-in model) unless it is the loaded one."""
        if self._loaded is not None and name in (None, self._loaded.name):
            return
        self._emit(Status(f"loading {name or 'the built-in model'}"))
        precision = self.settings.precision  # None: the loader's default (a loader may take only a name)
        options = {"precision": precision} if precision else {}  # a loader may take only a name
        options.update({"pipeline": True} if self.settings.pipeline else {})
        self._loaded = self._loader(name, **options)
        profile, path, notes = resolve_profile(self.settings.profile, self._loaded.shape)
        self._profile, self._profile_name = profile, (path.name if path else None)
        method, method_notes = make_method(self.settings.method, profile)
        kv_bits = kv_bits_setting(self.settings.kv_bits, self.settings.kv_group_size,
                                  store_bits=self.settings.store_bits)  # packs nothing while the method is full
        self._session = Session(self._loaded.model, self._loaded.tokenizer, method, region=self.settings.region,
                                kv_bits=kv_bits)
        if kv_bits and not self._session.kv_bits:
            notes.append(AS_COMPUTED_NOTE)
        for note in notes + method_notes:
            self._emit(Notice(note))

    def _open(self, path: str | Path):
        path, self._refused = Path(path), None
        self._emit(Status(f"reading {path.name}"))
        text = self._ranks.share_result(lambda: read_document(path))  # rank 0's file
        self._ensure_model(self.settings.model)
        document = self._fitted(path, text)
        self._budget_tokens(self.settings, len(document.prefix))
        self._prefill(document)
        seconds = None if self._conversation is None else self._session.stats.prefill_s
        self._emit(DocumentReady(path.name, len(document.prefix), seconds))

    def _fitted(self, path: Path, text: str) -> _Document:
        """``text`` as a document whole if it fits the context with an answer, else cut as
        ``settings.truncate`` says, leaving room for a question; refused under ``none``."""
        tokenizer, settings, context = self._loaded.tokenizer, self.settings, self._loaded.context_length
        prefix = document_prefix(tokenizer, text)
        if not context or len(prefix) + settings.max_tokens <= context:
            return _Document(path, text, prefix, document_hash(text))
        over = (f"{path.name} is {len(prefix):,} tokens + {settings.max_tokens:,} for the answer, over the "
                f"model's context of {context:,}")
        if settings.truncate == "none":
            self._refused = path
            raise CKVError(f"{over}: type /truncate middle (or start, end) to drop part of it, "
                           "or use a model with a longer context")
        room = conversation_room(settings, context)
        self._check_room(room)
        kept, dropped = cut_to_fit(tokenizer, text, lambda t: len(document_prefix(tokenizer, t)),
                                   context - settings.max_tokens - room, settings.truncate)
        self._emit(Notice(f"{over}: dropped {dropped:,} of its tokens at the {settings.truncate} "
                          f"(--truncate {settings.truncate}), leaving {room:,} for the conversation "
                          f"(/truncate {settings.truncate} N to choose) and {settings.max_tokens:,} for an answer"))
        return _Document(path, kept, document_prefix(tokenizer, kept), document_hash(text))

    def _truncate(self, where: str, room: int | None):
        if where not in TRUNCATE_CHOICES:
            raise CKVError(f"unknown /truncate {where!r}: use one of {', '.join(TRUNCATE_CHOICES)}")
        if room is not None:
            self._check_room(room)
        self.settings = replace(self.settings, truncate=where,
                                conversation_room=self.settings.conversation_room if room is None else room)
        if self._refused is not None and where != "none":
            return self._open(self._refused)
        self._emit(Notice(f"a document over the model's context will be cut at the {where}, leaving room for "
                          "the conversation" if where != "none" else "a document over the model's context will be refused"))

    def _check_room(self, room: int):
        context = self._loaded.context_length if self._loaded else None
        if room < 0:
            raise CKVError(f"a conversation room must be 0 or more tokens, not {room}")
        if context and room + self.settings.max_tokens >= context:
            raise CKVError(f"a conversation room of {room:,} tokens leaves nothing of the model's context "
                           f"({context:,}) for the document beside {self.settings.max_tokens:,} for an answer: "
                           "choose fewer")

    def _context(self):
        document, context = self._document, self._loaded.context_length if self._loaded else 0
        if document is None:
            raise CKVError("no document is open: open one with /doc FILE")
        used = len(document.prefix) + document.conversation_tokens
        self._emit(Notice(
            f"context of {context:,} tokens: the document {len(document.prefix):,}, the conversation "
            f"{document.conversation_tokens:,} ({_count(len(document.turns), 'turn')}), room for an answer "
            f"{self.settings.max_tokens:,}, free {context - used - self.settings.max_tokens:,}; a question that does "
            "not fit drops the oldest turns first"))

    def _prefill(self, document: _Document, question: list[int] | None = None):
        """Read ``document`` (and replay its turns) into a fresh cache.

        With the full cache on disk, a stored read of the same document is reused;
        otherwise every row read is written to a new store. In memory, a document whose
        full cache exceeds the KV limit is read in chunks scored by ``question`` (or by
        the first turn's); with neither, reading waits for the first question."""
        session, self._phase = self._session, "prefilling"
        session.reset()
        self._end_conversation()
        budget = self._budget_tokens(self.settings, len(document.prefix))
        working, note = plan_prefill(self._loaded, len(document.prefix), budget, self.settings.kv_limit, PREFILL_STEP,
                                     self._ranks)
        if self._full_cache_on_disk():
            if note:
                self._emit(Notice(f"{note}; every row goes to disk, so each question selects from the whole document"))
            store_bits = self._store_bits()
            key = document_key(self._loaded.identity, document.prefix, working, PREFILL_STEP, session.method.name,
                               self._profile, store_bits)
            limit = parse_size(self.settings.store_limit) if self.settings.store_limit else DEFAULT_LIMIT_BYTES
            full = read_or_reuse(session, self._store_root(), key, document.path.name,
                                 lambda writer: self._read(document, working, None, writer),
                                 lambda text: self._emit(Notice(text)), limit, store_bits, document.prefix)
            return self._converse(document, budget, full)
        if note and question is None and document.turns:
            self._emit(Notice(f"{note}, scored by the first question"))
        elif note and question is None:
            self._document = document
            return self._emit(Notice(f"{note}: it will be read with your first question, which chooses what to keep"))
        self._read(document, working, question or (document.turns[0].question_tokens if document.turns else None))
        self._converse(document, budget, None)

    def _read(self, document: _Document, working: int | None, question: list[int] | None,
              store: StoreWriter | None = None):
        """Prefill the document, showing progress; into ``store`` too when given (then
        no question scores the chunks, so that the stored rows suit any question)."""
        session = self._session
        self._emit(Status(f"reading {document.path.name} into the cache"))
        start = time.perf_counter()

        def progress(done: int, total: int):
            if self._ranks.any(self._closing.is_set()):
                raise Cancelled
            self._emit(Progress(done, total, done / max(time.perf_counter() - start, 1e-9)))
            self._maybe_view()

        session.prefill(document.prefix, progress, working_budget=working, question=question, store=store)

    def _converse(self, document: _Document, budget: int | None, full: DiskFullCache | None):
        """Start the conversation over the document just read, replaying its turns."""
        self._conversation = Conversation(self._session, self.settings.policy, budget, full)
        self._conversation.open(None if full else self._session.snapshot())
        self._conversation.replay([(turn.question_tokens, turn.answer_tokens) for turn in document.turns])
        self._document = document

    def _end_conversation(self):
        """Drop the conversation, and its rows on disk (the document's store stays)."""
        if self._conversation is not None and self._conversation.full_on_disk is not None:
            self._conversation.full_on_disk.close()
        self._document = self._conversation = None

    def _full_cache_on_disk(self) -> bool:
        return self.settings.policy == "per-question" and self.settings.full_cache == "disk"

    def _store_root(self) -> Path:
        return Path(self.settings.store_dir).expanduser() if self.settings.store_dir else store_root()

    def _store_bits(self) -> KVBits | None:
        return store_bits_setting(self.settings.store_bits, self.settings.kv_group_size)

    def _ask(self, question: str):
        document = self._document
        if document is None:
            raise CKVError("no document is open: open one with /doc FILE")
        tokens = self._make_room(document, question)
        if self._conversation is None:  # too long to hold whole: read now, chunks scored by this question
            self._prefill(document, tokens)
        self._stop.clear()
        self._phase = "answering"
        self._emit(Answering(question))
        detokenizer = self._loaded.tokenizer.detokenizer
        detokenizer.reset()
        answer: list[int] = []
        asked = self._conversation.turns
        try:
            settings = self.settings
            stop = lambda: self._ranks.any(self._stop.is_set())  # noqa: E731 (rank 0's Esc stops every rank)
            for token in self._conversation.ask(tokens, settings.max_tokens, stop, settings.repetition_penalty):
                answer.append(token)
                detokenizer.add_token(token)
                self._send_segment(detokenizer)
                self._maybe_view(force=len(answer) == 1)  # the first shows the compressed cache
        finally:
            detokenizer.finalize()
            self._send_segment(detokenizer)
            if self._conversation.turns > asked:  # the question was read (its selection did not fail)
                document.turns.append(_Turn(question, detokenizer.text, tokens, answer))
        self._emit(Reply(detokenizer.text, self._stop.is_set()))

    def _send_segment(self, detokenizer):
        segment = detokenizer.last_segment  # reading it consumes it
        if segment:
            self._emit(Chunk(segment))

    def _change(self, change: dict):
        """Apply a new method or budget: now if the full cache is kept, else after /reread."""
        settings = replace(self.settings, **change)
        method, notes = make_method(settings.method, self._profile)
        if self._document is None:
            self.settings = settings
            return self._emit(Notice(f"method {settings.method}, budget {settings.budget}: used for the next document"))
        budget = self._budget_tokens(settings, len(self._document.prefix), method)
        if self._conversation is None:  # not read yet: read with these settings
            self._session.method = method
            self.settings = settings
            return self._emit(Notice(f"method {method.name} at budget {budget} from the first question"))
        if self._session.compressed and self._conversation.full_on_disk is None:
            self._pending = settings
            return self._emit(Notice(
                f"the full cache was dropped (policy {settings.policy}): method {settings.method} at budget "
                f"{settings.budget} needs the document read again; type /reread to do it now "
                f"({self._session.position:,} tokens)"))
        try:
            self._session.method = method
        except CKVError as wider:  # its window needs queries the document was not read with
            self._pending = settings
            return self._emit(Notice(f"{wider}; type /reread to do it now"))
        self.settings, self._conversation.budget = settings, budget
        for note in notes:
            self._emit(Notice(note))
        self._emit(Notice(f"method {method.name} at budget {budget} from the next question"))

    def _reread(self):
        if self._document is None:
            raise CKVError("no document is open: open one with /doc FILE")
        if self._pending is not None:
            self.settings, self._pending = self._pending, None
            self._session.reset()  # read anew: any window can be installed
            self._session.method = make_method(self.settings.method, self._profile)[0]
        self._prefill(self._document)
        self._emit(Notice(f"read {self._document.path.name} and {len(self._document.turns)} turns again"))

    def _budget_tokens(self, settings: ChatSettings, prompt_tokens: int, method=None) -> int | None:
        """Tokens per layer for ``settings``; refuses a budget too small before any prefill."""
        method = method or make_method(settings.method, self._profile)[0]
        if not method.compresses:
            return None
        budget = parse_budget(settings.budget, prompt_tokens)
        self._session.layer_budgets(budget, method)
        return budget

    def _make_room(self, document: _Document, question: str) -> list[int]:
        """``question``'s tokens after the conversation; when they and an answer do not fit
        the context, the oldest turns go first (never the document, never the question),
        said in a note, and the document and the turns left are read again (a stored
        document is reused). Refused when even the document alone leaves no room."""
        tokenizer, context, answer = self._loaded.tokenizer, self._loaded.context_length, self.settings.max_tokens
        for drop in range(len(document.turns) + 1):
            kept = _restarted(tokenizer, document, document.turns[drop:]) if drop else document.turns
            tokens = question_tokens(tokenizer, document.text, document.prefix, [(t.question, t.answer) for t in kept],
                                     question)
            used = len(document.prefix) + sum(len(t.question_tokens) + len(t.answer_tokens) for t in kept) + len(tokens)
            if not context or used + answer <= context:
                break
        else:
            raise CKVError(f"this question takes {used:,} tokens with the document alone + {answer:,} for the "
                           f"answer, over the model's context of {context:,}: shorten the question, lower the "
                           "answer's max tokens, or /truncate the document with more room for the conversation")
        if drop:
            freed = document.conversation_tokens - sum(len(t.question_tokens) + len(t.answer_tokens) for t in kept)
            self._emit(Notice(f"the conversation would overflow the model's context of {context:,}: dropped the "
                              f"oldest {_count(drop, 'turn')} of {len(document.turns)} ({freed:,} tokens); the document "
                              f"and the last {len(kept)} stay"))
            document.turns = kept
            self._prefill(document)
        return tokens

    def _save(self, path: str | Path):
        path, session, document = Path(path), self._session, self._document
        self._single_process("saving a session")
        if document is None:
            raise CKVError("nothing to save: open a document first")
        if self._conversation is None:
            raise CKVError(f"nothing to save yet: {document.path.name} is read with the first question; ask one, then save")
        if not session.consistent:
            raise CKVError("the cache is out of step after an interrupted step; /reread, then save")
        metadata = {
            "model": self._loaded.name, "profile": self._profile_name,
            "settings": asdict(replace(self.settings, kv_bits=session.kv_bits.bits if session.kv_bits else AS_COMPUTED)),
            "document": str(document.path.resolve()),
            "document_hash": document.digest, "turns": [asdict(t) for t in document.turns],
            "conversation_turns": self._conversation.turns, "prefill_s": session.stats.prefill_s,
            "kv_bytes_full": session.stats.kv_bytes_full, "prompt_tokens": session.stats.prompt_tokens,
        }
        full, on_disk = self._conversation.full_on_disk, None
        if full is not None:  # the document's store is referred to; the conversation's rows are carried
            on_disk = OnDisk(full.store.path.name, str(full.store.path.parent), full.store.manifest["kv_bits"],
                             *self._conversation.disk_state(), full.tail.tokens, full.tail_bytes())
        session_file.write(path, SavedSession(metadata, session.caches, session.remembered_queries(), session.others,
                                              on_disk))
        self._emit(Saved(str(path)))

    def _resume(self, path: str | Path):
        path = Path(path)
        self._single_process("resuming a session")
        self._emit(Status(f"restoring {path.name}"))
        saved = session_file.read(path)
        metadata, on_disk = saved.metadata, saved.on_disk
        referred = "full_cache" in metadata  # a store referred to in an older layout, without the conversation's rows
        if self.settings.model not in (None, metadata["model"]):
            raise CKVError(f"{path}: saved with model {metadata['model']}, not {self.settings.model}; "
                           f"resume without --model or with --model {metadata['model']}")
        document = Path(metadata["document"])
        try:
            text = read_document(document)
        except CKVError as error:
            raise CKVError(f"{path}: its document cannot be read ({error})") from None
        if document_hash(text) != metadata["document_hash"]:
            raise CKVError(f"{path}: {document} has changed since the session was saved; "
                           f"open it anew with --doc {document}")
        self.settings = ChatSettings(**metadata["settings"])
        if self.settings.kv_bits is None:  # saved before the kept rows were 8-bit by default
            self.settings = replace(self.settings, kv_bits=AS_COMPUTED)
        if self._full_cache_on_disk() and not (on_disk or referred):  # saved with it in memory, or before it could be on disk
            self.settings = replace(self.settings, full_cache="memory")
        self._ensure_model(metadata["model"])
        session = self._session
        session.kv_bits = kv_bits_setting(self.settings.kv_bits, self.settings.kv_group_size,
                                          store_bits=self.settings.store_bits)
        try:
            session.take_over(saved.caches, saved.window_queries, saved.others)
        except CKVError as error:
            raise CKVError(f"{path}: {error}") from None
        stats = session.stats
        stats.prefill_s, stats.prompt_tokens = metadata["prefill_s"], metadata["prompt_tokens"]
        stats.kv_bytes_full = metadata["kv_bytes_full"]
        turns = [_Turn(**t) for t in metadata["turns"]]
        document = replace(self._fitted(document, text), turns=turns)
        budget = self._budget_tokens(self.settings, len(document.prefix))
        full = self._resumed_full_cache(on_disk) if on_disk else None
        if (on_disk or referred) and full is None:
            why = "is gone (removed past the disk limit, or damaged)" if on_disk else "is referred to in an older session format"
            self._emit(Notice(f"the stored cache of {document.path.name} {why}: reading it and the conversation again"))
            self._prefill(document)
        else:
            self._conversation = Conversation(session, self.settings.policy, budget, full)
            self._conversation.turns = metadata["conversation_turns"]
            if full is not None:
                self._conversation.resume_disk_state(on_disk.unread, on_disk.selection_queries, on_disk.selection_others)
            self._document = document
        self._emit(Resumed(self.settings, str(document.path), document.pairs))

    def _resumed_full_cache(self, on_disk: OnDisk) -> DiskFullCache | None:
        """The saved session's full cache on disk: the document's store it refers to, and
        the conversation's rows it carries; None when the store is gone."""
        bits = KVBits(**on_disk.store_bits) if on_disk.store_bits else None
        full = stored_full_cache(Path(on_disk.store_dir), on_disk.store, lambda text: self._emit(Notice(text)), bits)
        if full is not None:
            full.restore_tail(on_disk.tail, on_disk.tail_tokens)
        return full

    def _single_process(self, what: str):
        if self._ranks.size > 1:
            raise CKVError(f"{what} across {self._ranks.size} processes is not supported: the cache is split over "
                           "them; run the chat on one machine to save or resume")

    def _maybe_view(self, force: bool = False):
        """Show the cache now and then (``force``: now, a point every rank reaches)."""
        now = time.perf_counter()
        if force or now - self._last_view >= VIEW_INTERVAL_S:
            self._last_view = now
            self._emit(self._view(every_rank=force))

    def _kept(self) -> KeptCache:
        """The cache the panel calls kept: the one in use, or after a ``per-question``
        answer the compressed copy that answer used (the full cache is back)."""
        conversation = self._conversation
        last = conversation.last_answer if conversation and self._phase != "answering" else None
        return last or KeptCache.of(self._session)

    def _view(self, every_rank: bool = False) -> CacheView:
        """What the panel shows. A group's bytes are summed over the ranks where every
        rank makes the view (``every_rank``); between those points they stay as they were."""
        session, stats = self._session, self._session.stats
        conversation, kept = self._conversation, self._kept()
        figures = {"kept_bytes": kept.kv_bytes, "held_bytes": session.kv_bytes + (conversation.held_bytes if conversation else 0),
                   "full_bytes": session.full_bytes, "disk_bytes": conversation.disk_bytes if conversation else 0}
        if self._ranks.size > 1 and every_rank:
            self._group_bytes = {name: self._ranks.total(value) for name, value in figures.items()}
        figures.update(self._group_bytes)
        return CacheView(
            phase=self._phase, model=self._loaded.name, method=session.method.name,
            profile=self._profile_name, budget=conversation.budget if conversation else None,
            kv_bits=session.kv_bits.bits if session.kv_bits and session.method.compresses else None,
            policy=self.settings.policy,
            document=self._document.path.name if self._document else None,
            document_tokens=len(self._document.prefix) if self._document else 0,
            position=session.position, context_length=self._loaded.context_length,
            **figures,
            reselect_s=stats.reselect_s if conversation and conversation.full_on_disk else None,
            layer_tokens=kept.layer_tokens, compressed=kept.compressed,
            conversation_tokens=self._document.conversation_tokens if self._document else 0,
            answer_room=self.settings.max_tokens,
            peak_memory_bytes=mx.get_peak_memory(), prefill_tps=stats.prefill_tps,
            decode_tps=stats.decode_tps,
        )
