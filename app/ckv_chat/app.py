"""The Textual chat: a document, a conversation about it, and the live KV-cache panel.

The app drives any engine with the small interface of :class:`Engine` and reacts to the
plain events it posts; it never touches MLX. Engine events arrive from the engine's
thread through ``post_message``, which keeps their order.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Protocol

from textual import on
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import Button, Footer, Header, Input, Label, ProgressBar

from ckv_mlx.chat.events import (
    Answering, CacheView, ChatSettings, Chunk, DocumentReady, Failure, Notice, Progress, Reply,
    Resumed, Saved, Status,
)

from .widgets import Answer, CachePanel, Note, PromptInput, UserMessage

POLICY_LABELS = {
    "first-question": "first-question: compress with the first question (the paper); follow-ups use what was kept",
    "agnostic": "agnostic: compress before any question; every question uses the same small cache",
    "per-question": "per-question: full cache kept (on disk by default), compressed afresh for each question (best answers)",
}
HELP = """Commands: /doc FILE (open another document), /budget N (tokens per layer, or 5%),
/method NAME, /reread (read the document and chat again with new settings),
/truncate start|middle|end|none [N] (a document over the context: cut there leaving N tokens for
the conversation, or refuse it), /context (where the context's tokens go; a question that does
not fit drops the oldest turns first),
/save [FILE], /export [FILE] (transcript as Markdown), /copy (last answer), /help, /quit.
Keys: Enter sends, Esc stops an answer, Up/Down recall prompts, Ctrl+S saves the session,
Ctrl+Y copies the last answer, Ctrl+O exports the transcript, Ctrl+Q quits."""


class Engine(Protocol):
    """What the app asks of an engine; every call returns at once."""

    def open(self, path: str | Path): ...
    def ask(self, question: str): ...
    def stop(self): ...
    def set_budget(self, budget: str): ...
    def set_method(self, method: str): ...
    def truncate(self, where: str, room: int | None = None): ...
    def context(self): ...
    def reread(self): ...
    def save(self, path: str | Path): ...
    def resume(self, path: str | Path): ...
    def close(self): ...


class EngineEvent(Message):
    """An event from the engine's thread."""

    def __init__(self, event: object):
        super().__init__()
        self.event = event


class QuitScreen(ModalScreen[str]):
    """Asked on quit when the conversation changed since the last save."""

    BINDINGS = [("s", "dismiss('save')", "Save and quit"), ("q", "dismiss('quit')", "Quit"),
                ("escape", "dismiss('cancel')", "Cancel")]

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label("Save this session before quitting?  (s: save and quit, q: quit, Esc: cancel)")
            with Horizontal():
                yield Button("Save and quit", id="save", variant="primary")
                yield Button("Quit", id="quit", variant="error")
                yield Button("Cancel", id="cancel")

    @on(Button.Pressed)
    def choose(self, event: Button.Pressed):
        self.dismiss(event.button.id)


class ChatApp(App):
    """``ckv-chat``: chat with a long document; see the module doc."""

    CSS_PATH = "app.tcss"
    TITLE = "ckv-chat"
    AUTO_FOCUS = "#prompt"
    BINDINGS = [
        Binding("escape", "stop", "Stop answer"),
        Binding("ctrl+s", "save", "Save"),
        Binding("ctrl+y", "copy_answer", "Copy answer"),
        Binding("ctrl+o", "export", "Export"),
        Binding("ctrl+q", "quit", "Quit", priority=True),
    ]

    def __init__(self, make_engine: Callable[[Callable[[object], None]], Engine], settings: ChatSettings,
                 doc: Path | None = None, resume: Path | None = None, session: Path | None = None):
        super().__init__()
        self.make_engine, self.settings = make_engine, settings
        self.doc, self.resume_path = doc, resume
        self.session_path = session or resume
        self.engine: Engine | None = None
        self.transcript: list[tuple[str, str]] = []
        self.unsaved = False
        self.answering = False
        self._answer: Answer | None = None
        self._stream = None
        self._quit_after_save = False

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal():
            with Vertical(id="chat"):
                yield Label(POLICY_LABELS.get(self.settings.policy, self.settings.policy), id="policy")
                yield VerticalScroll(id="log")
                yield Label("", id="prefill-label")
                yield ProgressBar(id="prefill", show_eta=False)
                yield PromptInput(placeholder="Ask about the document (/help for commands)", id="prompt")
            yield CachePanel(id="cache")
        yield Footer()

    def on_mount(self):
        self.engine = self.make_engine(lambda event: self.post_message(EngineEvent(event)))
        self.query_one("#prefill").display = False
        self.query_one("#prefill-label").display = False
        if self.resume_path:
            self.engine.resume(self.resume_path)
        elif self.doc:
            self.open_document(self.doc)
        else:
            self.note("No document yet: open one with /doc FILE.")

    def on_unmount(self):
        if self.engine is not None:
            self.engine.close()

    # Chat log.

    def log_widget(self, widget):
        log = self.query_one("#log", VerticalScroll)
        log.mount(widget)
        log.scroll_end(animate=False)
        return widget

    def note(self, text: str, error: bool = False):
        self.log_widget(Note(text, markup=False, classes="error" if error else ""))

    def open_document(self, path: Path):
        self.doc = path
        self.sub_title = path.name
        self.session_path = self.session_path or Path(f"{path.stem}.ckv")
        self.engine.open(path)

    # Input.

    @on(Input.Submitted, "#prompt")
    def submitted(self, event: Input.Submitted):
        text = event.value.strip()
        prompt = self.query_one("#prompt", PromptInput)
        prompt.remember(text)
        prompt.value = ""
        if not text:
            return
        if text.startswith("/"):
            return self.command(text)
        self.log_widget(UserMessage(text, markup=False))
        self.transcript.append(("question", text))
        self.unsaved = True
        self.engine.ask(text)

    def command(self, text: str):
        name, _, arg = text[1:].partition(" ")
        arg = arg.strip()
        needs_arg = {"doc": "FILE", "budget": "N (tokens per layer, or 5%)", "method": "NAME",
                     "truncate": "start, middle, end or none, then optionally the tokens left for the conversation"}
        if name in needs_arg and not arg:
            return self.note(f"/{name} needs {needs_arg[name]}", error=True)
        actions = {
            "doc": lambda: self.open_document(Path(arg).expanduser()),
            "budget": lambda: self.engine.set_budget(arg),
            "method": lambda: self.engine.set_method(arg),
            "truncate": lambda: self.truncate(arg),
            "context": self.engine.context,
            "reread": self.engine.reread,
            "save": lambda: self.save(Path(arg).expanduser() if arg else None),
            "export": lambda: self.export(Path(arg).expanduser() if arg else None),
            "copy": self.action_copy_answer,
            "help": lambda: self.note(HELP),
            "quit": self.action_quit,
        }
        if name not in actions:
            return self.note(f"unknown command /{name}; /help lists them", error=True)
        actions[name]()

    def truncate(self, arg: str):
        where, _, room = arg.partition(" ")
        if room.strip() and not room.strip().isdigit():
            return self.note(f"/truncate {where} N: N is a number of tokens, not {room.strip()!r}", error=True)
        self.engine.truncate(where, int(room) if room.strip() else None)

    # Actions.

    def action_stop(self):
        if self.answering:
            self.engine.stop()

    def action_save(self):
        self.save(None)

    def save(self, path: Path | None):
        if path is not None:
            self.session_path = path
        if self.session_path is None:
            return self.note("nothing to save: open a document first", error=True)
        self.engine.save(self.session_path)

    def action_copy_answer(self):
        answers = [text for role, text in self.transcript if role == "answer"]
        if not answers:
            return self.note("no answer to copy yet", error=True)
        self.copy_to_clipboard(answers[-1])
        self.notify("Last answer copied to the clipboard")

    def action_export(self):
        self.export(None)

    def export(self, path: Path | None):
        path = path or Path(f"{self.doc.stem if self.doc else 'chat'}-transcript.md")
        try:
            write_atomically(path, transcript_markdown(self.doc, self.transcript))
        except OSError as error:
            return self.note(f"cannot write {path}: {error.strerror}; choose a writable path", error=True)
        self.note(f"transcript exported to {path}")

    def action_quit(self):
        if self.unsaved and self.session_path is not None:
            self.push_screen(QuitScreen(), self._quit_choice)
        else:
            self.exit()

    def _quit_choice(self, choice: str):
        if choice == "quit":
            self.exit()
        elif choice == "save":
            self._quit_after_save = True
            self.save(None)

    # Engine events.

    async def on_engine_event(self, message: EngineEvent):
        match message.event:
            case Status(text):
                self.sub_title = f"{self.doc.name if self.doc else ''} · {text}".strip(" ·")
            case Progress() as progress:
                self.show_progress(progress)
            case DocumentReady(name, tokens, seconds):
                self.hide_progress()
                self.sub_title = name
                if seconds is None:
                    self.note(f"opened {name}: {tokens:,} tokens, read with your first question. Ask away.")
                else:
                    self.note(f"read {name}: {tokens:,} tokens in {seconds:.1f} s. Ask away.")
            case Answering():
                self.hide_progress()  # a long document is read with the first question
                self.answering = True
                self._answer = self.log_widget(Answer(""))
                self._stream = Answer.get_stream(self._answer)
            case Chunk(text):
                if self._stream is not None:
                    await self._stream.write(text)
            case Reply(text, interrupted):
                await self.finish_answer(text, interrupted)
            case CacheView() as view:
                self.query_one(CachePanel).show(view)
            case Notice(text):
                self.note(text)
            case Failure(text):
                self.hide_progress()
                self.note(f"error: {text}", error=True)
            case Saved(path):
                self.unsaved = False
                self.note(f"session saved to {path}")
                if self._quit_after_save:
                    self.exit()
            case Resumed(settings, document, turns):
                self.resumed(settings, Path(document), turns)

    async def finish_answer(self, text: str, interrupted: bool):
        if self._stream is not None:
            await self._stream.stop()
        self.answering, self._stream = False, None
        self.transcript.append(("answer", text))
        if interrupted:
            self.note("(stopped; the partial answer stays in the conversation)")

    def resumed(self, settings: ChatSettings, document: Path, turns: list[tuple[str, str]]):
        self.settings, self.doc = settings, document
        self.sub_title = document.name
        self.query_one("#policy", Label).update(POLICY_LABELS.get(settings.policy, settings.policy))
        for question, answer in turns:
            self.log_widget(UserMessage(question, markup=False))
            self.log_widget(Answer(answer))
            self.transcript += [("question", question), ("answer", answer)]
        self.note(f"resumed {document.name} with {len(turns)} turns, no prefill needed")

    def show_progress(self, progress: Progress):
        bar, label = self.query_one("#prefill", ProgressBar), self.query_one("#prefill-label", Label)
        bar.display = label.display = True
        bar.update(total=progress.total, progress=progress.done)
        eta = f" · ~{progress.eta_s:,.0f} s left" if progress.eta_s is not None else ""
        label.update(f"reading {progress.done:,} / {progress.total:,} tokens · {progress.tokens_per_s:,.0f} tok/s"
                     f"{eta} · you can type your question meanwhile")

    def hide_progress(self):
        self.query_one("#prefill").display = False
        self.query_one("#prefill-label").display = False


def transcript_markdown(doc: Path | None, transcript: list[tuple[str, str]]) -> str:
    lines = [f"# ckv-chat: {doc.name if doc else 'conversation'}", ""]
    for role, text in transcript:
        lines += [f"**{'You' if role == 'question' else 'Answer'}:** {text}", ""]
    return "\n".join(lines)


def write_atomically(path: Path, text: str):
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
