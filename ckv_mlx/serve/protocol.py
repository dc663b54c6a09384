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

ROLES = ("system", "user", "assistant", "developer")
MAX_STOP = 4  # as OpenAI's API


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
    what is wrong with it; ``max_tokens`` is the most one answer may ask for."""
    try:
        data = json.loads(body or b"null")
    except (ValueError, UnicodeDecodeError) as error:
        raise APIError(400, f"the request body is not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    _check_text(data)
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise APIError(400, "'model' is required: the name GET /v1/models lists", "model")
    if model != served:
        raise APIError(404, f"the model '{model}' does not exist: this server serves '{served}'", "model",
                       "model_not_found")
    if data.get("n") not in (None, 1):
        raise APIError(400, "only n = 1 is supported", "n")
    fields = dict(
        kind=kind, model=model, max_tokens=_max_tokens(data, max_tokens), temperature=_temperature(data),
        seed=_seed(data), stop=_stop(data), stream=_boolean(data, "stream"),
        include_usage=_boolean(_object(data, "stream_options"), "include_usage"),
        compression=_compression(data.get("ckv"), defaults, methods),
    )
    if kind == "chat":
        return Request(messages=_messages(data.get("messages")), **fields)
    return Request(prompt=_prompt(data.get("prompt")), **fields)


def _messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list of {role, content}", "messages")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise APIError(400, f"messages[{i}] needs a role: one of {', '.join(ROLES)}", f"messages[{i}].role")
        checked.append({"role": "system" if message["role"] == "developer" else message["role"],
                        "content": _content(message.get("content"), i)})
    if checked[-1]["role"] == "assistant":
        raise APIError(400, "the last message must be the user's (or the system's), not the assistant's", "messages")
    return checked


def _content(content, i: int) -> str:
    """A message's text: a string, or a list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    raise APIError(400, f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content")


def _prompt(prompt) -> str:
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise APIError(400, "'prompt' must be a non-empty string", "prompt")
    return prompt


def _check_text(data: dict):
    """Refuse a body whose strings cannot be UTF-8 (JSON's escapes allow a lone surrogate,
    ``\\ud800``, which no tokenizer, template or answer can carry), anywhere in it."""
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(400, "the request holds text that is not valid Unicode (a lone surrogate such as \\ud800); "
                            "send UTF-8 text") from None


def _max_tokens(data: dict, limit: int) -> int:
    value = data.get("max_completion_tokens")
    value = data.get("max_tokens") if value is None else value
    value = min(256, limit) if value is None else value
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise APIError(400, f"'max_tokens' must be a positive integer, not {value!r}", "max_tokens")
    if value > limit:
        raise APIError(400, f"'max_tokens' {value:,} is more than this server allows ({limit:,})", "max_tokens")
    return value


def _temperature(data: dict) -> float:
    value = data.get("temperature", 0.0)
    if value is None:
        return 0.0
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 2:
        raise APIError(400, f"'temperature' must be a number from 0 to 2, not {value!r}", "temperature")
    return float(value)


def _seed(data: dict) -> int | None:
    """OpenAI's seed, within what MLX's random seed takes (an unsigned 64-bit integer)."""
    value = data.get("seed")
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**64):
        raise APIError(400, f"'seed' must be an integer from 0 to 2**64 - 1, not {value!r}", "seed")
    return value


def _object(data: dict, name: str) -> dict:
    """The JSON object ``data[name]`` ({} when absent or null)."""
    value = data.get(name)
    if value is not None and not isinstance(value, dict):
        raise APIError(400, f"'{name}' must be an object, not {value!r}", name)
    return value or {}


def _boolean(data: dict, name: str) -> bool:
    value = data.get(name, False)
    if not isinstance(value, bool) and value is not None:
        raise APIError(400, f"'{name}' must be true or false", name)
    return bool(value)


def _stop(data: dict) -> list[str]:
    stop = data.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
        raise APIError(400, f"'stop' must be a string or a list of at most {MAX_STOP} non-empty strings", "stop")
    return stop


def _compression(extension, defaults: Compression, methods) -> Compression:
    """The server's defaults, with what the request's ``ckv`` field overrides."""
    if extension is None:
        return defaults
    if not isinstance(extension, dict) or set(extension) - {"method", "budget", "kv_bits"}:
        raise APIError(400, "'ckv' takes method, budget and kv_bits", "ckv")
    chosen = replace(defaults, **{k: v for k, v in extension.items() if k != "budget"})
    if "budget" in extension:
        chosen = replace(chosen, budget=str(extension["budget"]))
    if not isinstance(chosen.method, str) or chosen.method.split("+")[0] not in methods:  # the worker checks options
        raise APIError(400, f"unknown method {chosen.method!r}: choose one of {', '.join(methods)}", "ckv.method")
    if chosen.kv_bits not in (None, 16, 8, 4):  # quantized.KV_BITS_CHOICES, without importing MLX
        raise APIError(400, f"ckv.kv_bits {chosen.kv_bits!r}: use 8 or 4, or 16 for the kept rows as computed "
                       "(null: the server's)", "ckv.kv_bits")
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
