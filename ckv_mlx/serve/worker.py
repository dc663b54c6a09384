"""The server's requests, run one at a time on its MLX thread, in the order they came.

Each request is read, compressed and answered by one :class:`~ckv_mlx.engine.session.Session`.
A long prefix of its prompt (the messages before the last one, or a completion prompt up
to its last line) is looked up in the document store: found, the request reads only its
new tokens against the stored rows and selects for its question (as the chat does with
the full cache on disk); not found, the prefix is read into the store as it goes, for the
next request that shares it. A conversation that grew since its prefix was stored reads
the new turns onto the stored rows and stores the longer prefix for its next turn. Every event of a request goes to its ``emit`` callback,
from this thread: ``("ready", prompt_tokens, kv_bytes)``, ``("text", piece)``, then ``("done",
finish_reason, usage, figures)``, or ``("error", APIError)``.
"""

from __future__ import annotations

import logging
import random
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import mlx.core as mx

from ..policy.budgets import parse_budget
from ..engine.reselection import extended, read_or_reuse
from ..errors import CKVError
from ..engine.memory import plan_prefill
from ..policy.methods import make_method
from ..kv.quantized import AS_COMPUTED, KVBits, kv_bits_setting
from ..engine.runtime import Cancelled, Job, MLXThread
from ..engine.session import PREFILL_STEP, Session
from ..group.ranks import Ranks
from ..disk.store import DEFAULT_LIMIT_BYTES, MANIFEST, DiskError, document_key, prune
from .protocol import APIError, Compression, Request, usage

MIN_PREFIX_TOKENS = 256  # a shorter prefix is read again rather than stored
_log = logging.getLogger(__name__)


@dataclass
class ServeSettings:
    """What the server's flags set for every request."""

    store_dir: Path | None = None  # None: no store, every prompt read whole
    store_limit: int = DEFAULT_LIMIT_BYTES
    store_bits: KVBits | None = None
    kv_limit: str | None = None
    region: int | None = None
    kv_bits: int | None = None  # a compressing request's unless it names its own (None: 8; 16: as computed)
    kv_group_size: int | None = None  # for the kv_bits (None: 64, or 32 where 64 does not divide)


class Worker:
    """One model, one session, one MLX thread; :meth:`submit` queues a request. Under
    ``mlx.launch`` rank 0's worker serves HTTP and sends each request to the other ranks'
    (:meth:`follow`) as it starts it; a stop asked of it stops every rank at the same point."""

    def __init__(self, loaded, profile, settings: ServeSettings, ranks: Ranks | None = None):
        self.loaded, self.profile, self.settings = loaded, profile, settings
        self.ranks = ranks or Ranks()
        self.session = Session(loaded.model, loaded.tokenizer, make_method("full")[0], region=settings.region)
        self._mlx = MLXThread("ckv-serve-mlx", on_exit=self._end)
        if settings.store_dir is not None:  # what a killed process left half-written goes now, and the store to its limit
            prune(settings.store_dir, settings.store_limit)

    @property
    def waiting(self) -> int:
        """Requests queued whose clients are still there."""
        return self._mlx.waiting

    @staticmethod
    def memory() -> dict[str, int]:
        """MLX's memory in bytes: ``active``, ``peak`` and ``cache`` (freed, kept for reuse)."""
        return {"active": mx.get_active_memory(), "peak": mx.get_peak_memory(), "cache": mx.get_cache_memory()}

    def submit(self, request: Request, emit: Callable[[tuple], None]) -> Job:
        """Queue ``request``; its events go to ``emit``. Cancelling the job returned stops
        it: before it starts, or between prefill chunks, or between tokens."""
        return self._mlx.submit(lambda job: self._serve(job, request, emit))

    def close(self):
        self._mlx.close(cancel=True)

    def follow(self):
        """A rank other than 0: serve rank 0's requests as they come, in its order, on this
        thread, until rank 0's worker closes."""
        def serve(shared: dict):
            request = Request(**{**shared, "compression": Compression(**shared["compression"])})
            self._serve(Job(lambda _: None), request, lambda event: None)

        self.ranks.follow(serve, ignore=(Cancelled,))
        self.close()

    def _end(self):
        """The MLX thread's last work: the other ranks told to stop."""
        self.ranks.send(None)

    def _serve(self, job: Job, request: Request, emit: Callable[[tuple], None]):
        if self.ranks.size > 1:  # the other ranks serve it too (rank 0 sends it), sampling the same tokens
            if request.seed is None and request.temperature > 0:
                request = replace(request, seed=random.getrandbits(31))
            self.ranks.send(asdict(request))
        try:
            self._run(job, request, emit)
        except APIError as error:
            emit(("error", error))
        except DiskError as error:  # the server's folders are not the client's business: logged here, not sent
            _log.warning("%s", error)
            emit(("error", APIError(507, f"the server's disk refused this request's cache ({error.reason}); "
                                         "retry later", code="insufficient_storage", kind="server_error")))
        except CKVError as error:
            emit(("error", APIError(400, str(error))))
        except Cancelled:
            raise
        except Exception as error:  # a bug must not take the server down with it
            _log.exception("internal error")
            emit(("error", APIError(500, f"internal error ({type(error).__name__}: {error})", kind="server_error")))
        finally:
            self.session.reset()  # nothing of a request outlives it
            mx.clear_cache()

    def _run(self, job: Job, request: Request, emit: Callable[[tuple], None]):
        session = self.session
        tokens, prefixes = self._prompt(request)
        self._check_fits(request, len(tokens))
        method, _ = make_method(request.compression.method, self.profile)
        session.reset()
        session.method = method
        bits = request.compression.kv_bits or (self.settings.kv_bits if method.compresses else None)
        packs = method.compresses and bits != AS_COMPUTED
        session.kv_bits = kv_bits_setting(bits, self.settings.kv_group_size if packs else None, method.compresses)
        budget = parse_budget(request.compression.budget, len(tokens)) if method.compresses else None
        session.layer_budgets(budget)  # a budget too small is refused before anything is read
        logits, reused = self._read(tokens, prefixes, budget, lambda *_: self._check(job))
        emit(("ready", len(tokens), self.ranks.total(session.kv_bytes)))
        text, finish, generated = self._answer(job, request, emit, logits)
        stats = session.stats
        figures = {"method": method.name, "budget": budget, "kv_bits": session.kv_bits.bits if session.kv_bits else None,
                   "kv_bytes_full": self.ranks.total(stats.kv_bytes_full),
                   "kv_bytes_kept": self.ranks.total(stats.kv_bytes_kept),
                   "prefix_tokens_reused": reused}
        emit(("done", finish, usage(len(tokens), generated), figures))

    def _prompt(self, request: Request) -> tuple[list[int], list[int]]:
        """The prompt's tokens, and the lengths of its prefixes worth storing, longest
        first: leading messages (:func:`_boundaries`), or a completion prompt up to its
        last line."""
        tokenizer = self.loaded.tokenizer
        if request.kind == "chat":
            try:
                tokens = list(tokenizer.apply_chat_template(request.messages, add_generation_prompt=True))
            except Exception as error:  # jinja's errors: a template that refuses a role or an order
                raise APIError(400, f"the model's chat template refuses these messages ({error})", "messages") from None
            heads = [head for k in _boundaries(len(request.messages)) if (head := self._head(request.messages[:k]))]
        else:
            tokens = tokenizer.encode(request.prompt)
            cut = request.prompt.rstrip("\n").rfind("\n")
            heads = [tokenizer.encode(request.prompt[: cut + 1])] if cut > 0 else []
        prefixes = [len(h) for h in heads if MIN_PREFIX_TOKENS <= len(h) < len(tokens) and tokens[: len(h)] == h]
        return tokens, prefixes

    def _head(self, messages: list[dict]) -> list[int] | None:
        """The tokens of the first messages of a chat, if the template renders them alone."""
        try:
            return list(self.loaded.tokenizer.apply_chat_template(messages))
        except Exception:  # e.g. a template that wants a user message: no prefix there
            return None

    def _check_fits(self, request: Request, prompt: int):
        context = self.loaded.context_length
        if context and prompt + request.max_tokens > context:
            where = "messages" if request.kind == "chat" else "prompt"
            raise APIError(400, f"the prompt is {prompt:,} tokens and max_tokens {request.max_tokens:,}: "
                                f"{prompt + request.max_tokens:,} in all, over the model's context of {context:,}; "
                                "shorten the prompt or lower max_tokens", where, "context_length_exceeded")

    def _read(self, tokens: list[int], prefixes: list[int], budget: int | None, progress):
        """The prompt's last logits with the cache compressed to ``budget``, and how many
        prompt tokens came from the store instead of being read; ``progress`` is called
        between prefill chunks (it raises to stop the read)."""
        session, root = self.session, self.settings.store_dir
        if not session.method.compresses or root is None or not prefixes:
            working, _ = plan_prefill(self.loaded, len(tokens), budget, self.settings.kv_limit, PREFILL_STEP, self.ranks)
            logits = session.prefill(tokens, progress, working_budget=working)
            session.compress(budget)
            return logits, 0
        keys = {n: self._key(tokens[:n], budget) for n in prefixes}
        longest = prefixes[0]
        chosen = self.ranks.share(next((n for n in prefixes if (root / keys[n] / MANIFEST).is_file()), longest))
        read = []

        def read_prefix(writer):
            read.append(chosen)
            working, _ = plan_prefill(self.loaded, chosen, budget, self.settings.kv_limit, PREFILL_STEP, self.ranks)
            session.prefill(tokens[:chosen], progress, working_budget=working, store=writer)

        full = read_or_reuse(session, root, keys[chosen], "the prompt's prefix", read_prefix, _log.info,
                             self.settings.store_limit, self.settings.store_bits, tokens[:chosen])
        if full is None:  # the disk refused: the prefix is in memory
            logits = session.feed(tokens[chosen:])
            session.compress(budget)
            return logits, 0
        if chosen < longest:  # an earlier turn's prefix: store this conversation's for the next turn
            full = extended(session, full, tokens[chosen:longest], root, keys[longest], self.settings.store_limit)
        session.forget_rows()
        logits = session.reselect(tokens[longest:], full, budget)
        full.close()
        return logits, 0 if read else chosen

    def _key(self, prefix: list[int], budget: int | None) -> str:
        working, _ = plan_prefill(self.loaded, len(prefix), budget, self.settings.kv_limit, PREFILL_STEP, self.ranks)
        return document_key(self.loaded.identity, prefix, working, PREFILL_STEP, self.session.method.name,
                            self.profile, self.settings.store_bits)

    def _answer(self, job: Job, request: Request, emit: Callable[[tuple], None], logits) -> tuple[str, str, int]:
        """Generate and stream the answer: its text, finish reason and token count.
        Text that could be the start of a stop string is held back until it is not."""
        tokenizer = self.loaded.tokenizer
        if request.seed is not None:
            mx.random.seed(request.seed)
        detokenizer = tokenizer.detokenizer
        detokenizer.reset()
        hold = max((len(s) for s in request.stop), default=1) - 1
        sent, count, stopped = 0, 0, None
        tokens = self.session.generate(logits, request.max_tokens, temp=request.temperature,
                                       should_stop=lambda: self._stopped(job))
        try:
            for token in tokens:
                count += 1
                detokenizer.add_token(token)
                text = detokenizer.text
                stopped = _first_stop(text, request.stop)
                if stopped is not None:
                    break
                if len(text) - hold > sent:
                    emit(("text", text[sent : len(text) - hold]))
                    sent = len(text) - hold
        finally:
            tokens.close()
        if stopped is None:
            detokenizer.finalize()
            text = detokenizer.text
            stopped = _first_stop(text, request.stop)
        text = text if stopped is None else text[:stopped]
        if len(text) > sent:
            emit(("text", text[sent:]))
        finish = "length" if stopped is None and count >= request.max_tokens else "stop"
        return text, finish, count


    def _stopped(self, job: Job) -> bool:
        """Whether ``job`` was cancelled (in a group: rank 0's was; every rank asks at once)."""
        return self.ranks.any(job.cancelled.is_set())

    def _check(self, job: Job):
        """Stop the request here if it was cancelled (between prefill chunks)."""
        if self._stopped(job):
            raise Cancelled


def _boundaries(messages: int) -> list[int]:
    """How many leading messages make the prefixes worth looking up, longest first: all but
    the last (what this request stores for its next turn), one and two fewer (the previous
    turn's), and the first alone (a document in a system prompt). A bounded number: a
    long body of short messages costs a few template renders, never one per message."""
    return sorted({k for k in (messages - 1, messages - 2, messages - 3, 1) if k > 0}, reverse=True)


def _first_stop(text: str, stops: list[str]) -> int | None:
    """Where the first of ``stops`` begins in ``text``, if any does."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None
