"""The app's widgets: the KV-cache panel, the prompt with history, the chat messages."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.widgets import Input, Label, Markdown, ProgressBar, Sparkline, Static

from ckv_mlx.chat.events import CacheView

MIB = 1024 * 1024
BARS = " ▁▂▃▄▅▆▇█"
CONTEXT_WARNING = 0.8
HISTORY_POINTS = 120


def mib(nbytes: int) -> str:
    return f"{nbytes / MIB:,.2f} MiB"


def bar_chart(values: list[int], rows: int = 3) -> str:
    """A vertical bar per value, ``rows`` characters tall, scaled to the largest."""
    top = max(values, default=0) or 1
    lines = []
    for row in reversed(range(rows)):
        line = ""
        for value in values:
            eighths = round(8 * rows * value / top) - 8 * row
            line += BARS[min(max(eighths, 0), 8)]
        lines.append(line)
    return "\n".join(lines)


def describe(view: CacheView) -> str:
    """The panel's numbers, one per line."""
    avg = sum(view.layer_tokens) / len(view.layer_tokens) if view.layer_tokens else 0
    ratio = f"{100 * view.ratio:.1f} %" if view.ratio is not None else "-"
    lines = [
        f"[b]kept[/b]      {mib(view.kept_bytes)}  ({avg:,.0f} tok/layer)",
        f"[b]full[/b]      {mib(view.full_bytes)}  ({view.position:,} tokens)",
        f"[b]ratio[/b]     {ratio}" + ("" if view.compressed else "  (not compressed)"),
    ]
    if view.held_bytes > view.kept_bytes:
        lines.append(f"[b]held[/b]      {mib(view.held_bytes)}  (full cache kept)")
    if view.disk_bytes:
        lines.append(f"[b]on disk[/b]   {mib(view.disk_bytes)}  (full cache)")
    if view.reselect_s:
        lines.append(f"[b]selected[/b]  in {view.reselect_s:.2f} s  (from disk)")
    lines += [
        f"[b]peak mem[/b]  {mib(view.peak_memory_bytes)}",
        f"[b]prompt[/b]    {view.prefill_tps:,.1f} tok/s",
        f"[b]decode[/b]    {view.decode_tps:,.1f} tok/s",
        "",
        f"[b]method[/b]    {view.method or '-'}",
        f"[b]budget[/b]    {view.budget if view.budget is not None else 'everything'}"
        + (f"  ({view.kv_bits}-bit)" if view.kv_bits else ""),
        f"[b]policy[/b]    {view.policy}",
        f"[b]profile[/b]   {view.profile or 'none'}",
        f"[b]model[/b]     {view.model or '-'}",
    ]
    return "\n".join(lines)


class CachePanel(VerticalScroll):
    """Live KV-cache statistics, layer bars, a sparkline of bytes and the context gauge."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.history: list[float] = []
        self.view = CacheView()

    def compose(self) -> ComposeResult:
        yield Label("KV cache", classes="title")
        yield Static(describe(self.view), id="numbers")
        yield Label("kept tokens per layer", classes="caption")
        yield Static("", id="layers")
        yield Label("cache bytes this session", classes="caption")
        yield Sparkline([], id="bytes")
        yield Label("context", classes="caption", id="context-label")
        yield ProgressBar(total=1, show_eta=False, id="context")

    def show(self, view: CacheView):
        self.view = view
        self.history = (self.history + [view.kept_bytes])[-HISTORY_POINTS:]
        self.query_one("#numbers", Static).update(describe(view))
        self.query_one("#layers", Static).update(bar_chart(view.layer_tokens))
        self.query_one("#bytes", Sparkline).data = list(self.history)
        gauge = self.query_one("#context", ProgressBar)
        gauge.update(total=max(view.context_length, 1), progress=view.position)
        label = self.query_one("#context-label", Label)
        label.update(f"context {view.position:,} / {view.context_length:,}\n"
                     f"document {view.document_tokens:,} · turns {view.conversation_tokens:,} · answer {view.answer_room:,}")
        label.set_class(view.context_used >= CONTEXT_WARNING, "warning")
        gauge.set_class(view.context_used >= CONTEXT_WARNING, "warning")


class PromptInput(Input):
    """The question box: Enter sends, up and down walk through earlier prompts."""

    BINDINGS = [("up", "older", "Older prompt"), ("down", "newer", "Newer prompt")]

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.history: list[str] = []
        self._index = 0

    def remember(self, text: str):
        if text and (not self.history or self.history[-1] != text):
            self.history.append(text)
        self._index = len(self.history)

    def action_older(self):
        if self._index > 0:
            self._index -= 1
            self.value = self.history[self._index]
            self.cursor_position = len(self.value)

    def action_newer(self):
        if self._index < len(self.history):
            self._index += 1
            self.value = self.history[self._index] if self._index < len(self.history) else ""
            self.cursor_position = len(self.value)


class UserMessage(Static):
    pass


class Note(Static):
    """A line from the app or the engine: a notice, or an error (class ``error``)."""


class Answer(Markdown):
    """An answer, streamed in as Markdown."""
