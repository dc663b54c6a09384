"""A stand-in for the chat engine: same interface and events, no model, own thread.

Documents are read with the real reader, so the app shows the real messages for bad
files; answers are canned words that stream until ``stop``.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from pathlib import Path

from ckv_mlx.chat.events import (
    Answering, CacheView, ChatSettings, Chunk, DocumentReady, Failure, Notice, Progress, Reply, Resumed,
    Saved, Status,
)
from ckv_mlx.text.documents import read_document
from ckv_mlx.errors import CKVError

LAYERS = 6
PER_TOKEN = 1024


class FakeEngine:
    def __init__(self, settings: ChatSettings, emit, answer: str = "The CFO is **Daniel Okafor**.",
                 token_delay: float = 0.0):
        self.settings, self.emit = settings, emit
        self.answer, self.token_delay = answer, token_delay
        self.calls: list[tuple] = []
        self.document: Path | None = None
        self.tokens = 0
        self.turns: list[tuple[str, str]] = []
        self.stopped = threading.Event()
        self.jobs: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._work, daemon=True)
        self.thread.start()

    def _work(self):
        while (job := self.jobs.get()) is not None:
            name, args = job
            try:
                getattr(self, f"_{name}")(*args)
            except CKVError as error:
                self.emit(Failure(str(error)))

    def _queue(self, name, *args):
        self.calls.append((name, *args))
        self.jobs.put((name, args))

    def open(self, path): self._queue("open", Path(path))
    def ask(self, question): self._queue("ask", question)
    def set_budget(self, budget): self._queue("set_budget", budget)
    def set_method(self, method): self._queue("set_method", method)
    def truncate(self, where, room=None): self._queue("truncate", where, room)
    def context(self): self._queue("context")
    def reread(self): self._queue("reread")
    def save(self, path): self._queue("save", Path(path))
    def resume(self, path): self._queue("resume", Path(path))

    def stop(self):
        self.calls.append(("stop",))
        self.stopped.set()

    def close(self):
        self.calls.append(("close",))
        self.jobs.put(None)

    def view(self, phase="idle", kept=None, held=None) -> CacheView:
        kept = self.tokens if kept is None else kept
        held = kept if held is None else held
        return CacheView(
            phase=phase, model="fake-model", method=self.settings.method, profile="fake.json",
            budget=int(self.settings.budget), policy=self.settings.policy,
            document=self.document.name if self.document else None, document_tokens=self.tokens,
            position=self.tokens, context_length=8192, kept_bytes=kept * LAYERS * PER_TOKEN,
            held_bytes=held * LAYERS * PER_TOKEN, full_bytes=self.tokens * LAYERS * PER_TOKEN,
            layer_tokens=[kept - 10 * i for i in range(LAYERS)], compressed=kept < self.tokens,
            peak_memory_bytes=300 * 2**20, prefill_tps=50.0, decode_tps=10.0,
        )

    def _open(self, path: Path):
        self.emit(Status(f"reading {path.name}"))
        text = read_document(path)
        total = max(len(text.split()), 1)
        for done in (total // 3, 2 * total // 3, total):
            self.emit(Progress(done, total, 100.0))
        self.document, self.tokens, self.turns = path, total, []
        self.emit(self.view())
        self.emit(DocumentReady(path.name, total, 1.5))

    def _ask(self, question: str):
        if self.document is None:
            raise CKVError("no document is open: open one with /doc FILE")
        self.stopped.clear()
        self.emit(Answering(question))
        said = []
        for word in self.answer.split(" "):
            if self.stopped.is_set():
                break
            piece = word if not said else f" {word}"
            said.append(piece)
            self.emit(Chunk(piece))
            self.tokens += 1
            self.emit(self.view("answering", *self.kept_and_held(answering=True)))
            time.sleep(self.token_delay)
        text = "".join(said)
        self.turns.append((question, text))
        self.emit(self.view("idle", *self.kept_and_held(answering=False)))
        self.emit(Reply(text, self.stopped.is_set()))

    def kept_and_held(self, answering: bool) -> tuple[int, int]:
        """Tokens in the compressed cache an answer uses, and in all the caches held:
        ``per-question`` holds the full cache too (beside the copy while answering)."""
        kept = int(self.settings.budget)
        if self.settings.policy != "per-question":
            return kept, kept
        return kept, self.tokens + kept * answering

    def _set_budget(self, budget: str):
        self.settings = ChatSettings(**{**self.settings.__dict__, "budget": budget})
        self.emit(Notice(f"budget {budget} from the next question"))
        self.emit(self.view())

    def _set_method(self, method: str):
        self.settings = ChatSettings(**{**self.settings.__dict__, "method": method})
        self.emit(Notice(f"method {method} from the next question"))

    def _truncate(self, where: str, room: int | None):
        self.emit(Notice(f"a document over the model's context will be cut at the {where}"))

    def _context(self):
        self.emit(Notice(f"context of 8,192 tokens: the document {self.tokens:,}"))

    def _reread(self):
        self.emit(Notice("read again"))

    def _save(self, path: Path):
        if not path.parent.is_dir():
            raise CKVError(f"cannot write {path}: no such folder; choose a writable path")
        data = {"document": str(self.document), "turns": self.turns, "settings": self.settings.__dict__}
        path.write_text(json.dumps(data))
        self.emit(Saved(str(path)))

    def _resume(self, path: Path):
        data = json.loads(path.read_text())
        self.document, self.turns = Path(data["document"]), [tuple(t) for t in data["turns"]]
        self.settings = ChatSettings(**data["settings"])
        self.tokens = 100
        self.emit(Resumed(self.settings, data["document"], self.turns))
        self.emit(self.view())
