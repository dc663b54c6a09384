"""The OpenAI wire format ckv-serve speaks: request bodies checked into a :class:`Request`,
responses and stream chunks built. No MLX here.

Compression settings ride in an extension field, ``"ckv": {"method", "budget",
"kv_bits"}``, which overrides the server's flags for one request; responses carry the
cache figures in ``"ckv"`` too, which clients that do not know it ignore.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field, replace

from .. import DEFAULT_METHOD
from . import schema


class APIError(Exception):
    """A request refused: its HTTP status and OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Compression:
    """How a request's cache is compressed: a method, a budget ("128", "5%"), KV bits
    (None: the server's)."""

    method: str = DEFAULT_METHOD
    budget: str = "128"
    kv_bits: int | None = None


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the server, and how many may wait for it."""

    max_tokens: int = 4096  # the most tokens one answer may ask for
    max_body_bytes: int = 32 * 2**20
    max_waiting: int = 16  # requests queued behind the running one; more are told to retry (429)


@dataclass(frozen=True)
class Request:
    """One checked request: a chat (``messages``) or a completion (``prompt``)."""

    kind: str  # "chat" or "completion"
    model: str
    max_tokens: int
    messages: list[dict] | None = None
    prompt: str | None = None
    temperature: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    compression: Compression = Compression()
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))


def parse(body: bytes, kind: str, served: str, defaults: Compression, max_tokens: int, methods) -> Request:
    """The request in ``body`` for the model ``served``, or :class:`APIError` (4xx) saying
    what is wrong with it; ``max_tokens`` is the most one answer may ask for. Types,
    ranges and nulls are :mod:`~ckv_mlx.serve.schema`'s; what depends on this server here."""
    try:
        data = json.loads(body or b"null")
    except (ValueError, UnicodeDecodeError) as error:
        raise APIError(400, f"the request body is not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    _check_text(data)
    try:
        checked = schema.validate(data, kind)
    except schema.SchemaError as error:
        raise APIError(400, str(error), error.param) from None
    if checked.model != served:
        raise APIError(404, f"the model '{checked.model}' does not exist: this server serves '{served}'", "model",
                       "model_not_found")
    fields = dict(
        kind=kind, model=checked.model, max_tokens=_max_tokens(checked, max_tokens),
        temperature=checked.temperature or 0.0, seed=checked.seed,
        stop=[checked.stop] if isinstance(checked.stop, str) else checked.stop or [], stream=bool(checked.stream),
        include_usage=bool(checked.stream_options and checked.stream_options.include_usage),
        compression=_compression(checked.ckv, defaults, methods),
    )
    if kind == "chat":
        return Request(messages=_messages(checked.messages), **fields)
    return Request(prompt=checked.prompt if isinstance(checked.prompt, str) else checked.prompt[0], **fields)


def _messages(messages: list[schema.Message]) -> list[dict]:
    """The messages as the chat template takes them: text only, developer as system."""
    if messages[-1].role == "assistant":
        raise APIError(400, "the last message must be the user's (or the system's), not the assistant's", "messages")
    return [{"role": "system" if m.role == "developer" else m.role,
             "content": m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)}
            for m in messages]


def _check_text(data: dict):
    """Refuse a body whose strings cannot be UTF-8 (JSON's escapes allow a lone surrogate,
    ``\\ud800``, which no tokenizer, template or answer can carry), anywhere in it."""
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(400, "the request holds text that is not valid Unicode (a lone surrogate such as \\ud800); "
                            "send UTF-8 text") from None


def _max_tokens(checked: schema.Completion, limit: int) -> int:
    value = checked.max_completion_tokens or checked.max_tokens or min(256, limit)
    if value > limit:
        raise APIError(400, f"'max_tokens' {value:,} is more than this server allows ({limit:,})", "max_tokens")
    return value


def _compression(extension: schema.Extension | None, defaults: Compression, methods) -> Compression:
    """The server's defaults, with what the request's ``ckv`` field sets."""
    if extension is None:
        return defaults
    chosen = replace(defaults, **extension.model_dump(exclude_none=True))
    chosen = replace(chosen, budget=str(chosen.budget))
    if chosen.method.split("+")[0] not in methods:  # the worker checks the options
        raise APIError(400, f"unknown method {chosen.method!r}: choose one of {', '.join(methods)}", "ckv.method")
    return chosen


def response(request: Request, text: str, finish: str, usage: dict, figures: dict) -> dict:
    """The whole answer, in the shape of the request's endpoint."""
    if request.kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
    return {**_head(request, chunk=False), "choices": [choice], "usage": usage, "ckv": figures}


def chunk(request: Request, text: str | None = None, finish: str | None = None, first: bool = False) -> dict:
    """One stream chunk: the role first (chat), then text, then the finish reason."""
    if request.kind == "chat":
        delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text is not None else {})
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
    return {**_head(request, chunk=True), "choices": [choice]}


def usage_chunk(request: Request, usage: dict, figures: dict) -> dict:
    """The last chunk when the client asked for usage: no choices, the counts."""
    return {**_head(request, chunk=True), "choices": [], "usage": usage, "ckv": figures}


def _head(request: Request, chunk: bool) -> dict:
    if request.kind == "chat":
        kind, prefix = ("chat.completion.chunk" if chunk else "chat.completion"), "chatcmpl"
    else:
        kind, prefix = "text_completion", "cmpl"
    return {"id": f"{prefix}-{request.id}", "object": kind, "created": request.created, "model": request.model}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
