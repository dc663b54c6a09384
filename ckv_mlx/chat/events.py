"""What the chat engine tells its UI: plain, immutable data, never an MLX array."""

from __future__ import annotations

from dataclasses import dataclass, field

from .. import DEFAULT_METHOD

DEFAULT_POLICY = "per-question"


@dataclass(frozen=True)
class ChatSettings:
    """How a chat compresses and answers; None means the default (built-in model, its
    shipped profile, the engine's region)."""

    model: str | None = None
    precision: str | None = None  # float32 or native (load_model's); None: $CKV_PRECISION, else the device's
    profile: str | None = None
    method: str = DEFAULT_METHOD
    budget: str = "128"
    policy: str = DEFAULT_POLICY
    max_tokens: int = 512
    region: int | None = None
    kv_bits: int | None = None  # the kept rows quantized to this many bits (16: as computed; None: 8, the default)
    kv_group_size: int | None = None  # values per scale and bias with kv_bits; None: 64 (mlx-lm), or 32 where 64 does not divide
    kv_limit: str | None = None
    repetition_penalty: float | None = None  # mlx-lm's, over the answer's last 20 tokens; None: off
    truncate: str = "none"  # a document over the context: refused, or cut at the start, middle or end
    conversation_room: int | None = None  # tokens a cut document leaves for questions and answers; None: a quarter of the context
    full_cache: str = "disk"  # per-question keeps the full cache on disk (memory holds the selection) or in memory
    store_dir: str | None = None  # where full caches on disk live; None: stores/ in the user cache folder
    store_limit: str | None = None  # disk kept for them before the least recently used go; None: 20 GiB
    store_bits: int | None = None  # the full cache on disk packed to this many bits (8: about half); None: as computed
    pipeline: bool = False  # under mlx.launch: the model split by layers over the ranks, not by heads


@dataclass(frozen=True)
class Status:
    """What the engine is doing now ("loading the model", "reading report.pdf")."""

    text: str


@dataclass(frozen=True)
class Progress:
    """Prefill progress: ``done`` of ``total`` tokens."""

    done: int
    total: int
    tokens_per_s: float

    @property
    def eta_s(self) -> float | None:
        return (self.total - self.done) / self.tokens_per_s if self.tokens_per_s else None


@dataclass(frozen=True)
class DocumentReady:
    """``name`` is open: read in ``seconds``, or None when too long to hold whole, in
    which case it is read with the first question."""

    name: str
    tokens: int
    seconds: float | None


@dataclass(frozen=True)
class Answering:
    """The engine starts answering ``question`` (the cache is being compressed)."""

    question: str


@dataclass(frozen=True)
class Chunk:
    """The next piece of the answer being generated."""

    text: str


@dataclass(frozen=True)
class Reply:
    """An answer is complete (or was stopped: ``interrupted``); the cache is consistent."""

    text: str
    interrupted: bool


@dataclass(frozen=True)
class Notice:
    """Something the user should know; nothing failed."""

    text: str


@dataclass(frozen=True)
class Failure:
    """A request failed with a one-line reason; the session is as it was."""

    text: str


@dataclass(frozen=True)
class Saved:
    path: str


@dataclass(frozen=True)
class Resumed:
    """A saved session is back: its settings, document and transcript."""

    settings: ChatSettings
    document: str
    turns: list[tuple[str, str]]


@dataclass(frozen=True)
class CacheView:
    """The KV cache now, in plain numbers. ``kept_*``, ``layer_tokens`` and ``compressed``
    describe the cache an answer uses: the one in use, or under ``per-question`` the
    compressed copy the last answer used; ``held_bytes`` is all KV memory held now and
    ``disk_bytes`` the full cache on disk, if it is there."""

    phase: str = "idle"
    model: str = ""
    method: str = ""
    profile: str | None = None
    budget: int | None = None
    kv_bits: int | None = None  # bits per value of the kept rows, when they are quantized
    policy: str = DEFAULT_POLICY
    document: str | None = None
    document_tokens: int = 0
    position: int = 0
    context_length: int = 0
    kept_bytes: int = 0
    held_bytes: int = 0
    full_bytes: int = 0
    disk_bytes: int = 0  # the full cache on disk (document and conversation)
    reselect_s: float | None = None  # how long the last selection from disk took
    layer_tokens: list[int] = field(default_factory=list)
    compressed: bool = False
    conversation_tokens: int = 0  # the turns' questions and answers, after the document
    answer_room: int = 0  # tokens kept free for the next answer (max tokens)
    peak_memory_bytes: int = 0
    prefill_tps: float = 0.0
    decode_tps: float = 0.0

    @property
    def ratio(self) -> float | None:
        """Kept bytes as a fraction of the full cache."""
        return self.kept_bytes / self.full_bytes if self.full_bytes else None

    @property
    def context_used(self) -> float:
        return self.position / self.context_length if self.context_length else 0.0
