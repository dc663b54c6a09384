"""The request bodies ckv-serve accepts, in one place: the fields of OpenAI's published
schema that it reads (types, ranges, nulls), as pydantic models. They check each request
(:func:`validate`), make the server's ``/openapi.json`` (:func:`openapi`) and generate the
fuzz tests' bodies. Fields they do not name (``user``, ``top_p``, ...) are ignored, as
OpenAI's clients send many. No MLX here.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.json_schema import models_json_schema

MAX_STOP = 4  # as OpenAI's API
NonEmpty = Annotated[str, Field(min_length=1)]


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Body):
    type: Literal["text"] = Field(description="'text'")
    text: str = Field("", description="a string")


class Message(_Body):
    role: Literal["system", "user", "assistant", "developer"] = Field(
        description="one of system, user, assistant, developer")
    content: str | list[TextPart] = Field(description="a string or a list of text parts")


class StreamOptions(_Body):
    include_usage: bool | None = Field(None, description="true or false")


class Extension(_Body):
    """ckv-mlx's own field: how this request's cache is compressed."""

    model_config = ConfigDict(strict=True, extra="forbid")
    method: str | None = Field(None, description="a method name, with options ('snapkv', 'compresskv-gqa+span8')")
    budget: int | str | None = Field(None, description="tokens per layer (128) or a share of the prompt ('5%')")
    kv_bits: Literal[16, 8, 4] | None = Field(None, description="8 or 4, or 16 for the kept rows as computed "
                                                                "(null: the server's)")


class Completion(_Body):
    """What both routes take."""

    model: NonEmpty = Field(description="the name GET /v1/models lists")
    max_tokens: int | None = Field(None, ge=1, description="a positive integer")
    max_completion_tokens: int | None = Field(None, ge=1, description="a positive integer")
    temperature: float | None = Field(None, ge=0, le=2, description="a number from 0 to 2")
    seed: int | None = Field(None, ge=0, lt=2**64, description="an integer from 0 to 2**64 - 1")
    stop: NonEmpty | Annotated[list[NonEmpty], Field(max_length=MAX_STOP)] | None = Field(
        None, description=f"a string or a list of at most {MAX_STOP} non-empty strings")
    stream: bool | None = Field(None, description="true or false")
    stream_options: StreamOptions | None = Field(None, description="an object: {\"include_usage\": true}")
    n: Literal[1] | None = Field(None, description="1 (one answer per request)")
    ckv: Extension | None = Field(None, description="an object with method, budget and kv_bits")


class CompletionBody(Completion):
    """POST /v1/completions."""

    prompt: NonEmpty | Annotated[list[NonEmpty], Field(min_length=1, max_length=1)] = Field(
        description="a non-empty string")


class ChatBody(Completion):
    """POST /v1/chat/completions."""

    messages: Annotated[list[Message], Field(min_length=1)] = Field(
        description="a non-empty list of {role, content}")


BODIES = {"chat": ChatBody, "completion": CompletionBody}
ROUTES = {"chat": "/v1/chat/completions", "completion": "/v1/completions"}


class SchemaError(ValueError):
    """A body against the schema: the field (OpenAI's ``param``) and what is wrong, in one line."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def validate(data: dict, kind: str) -> Completion:
    """``data`` (a JSON object) checked as the body of a ``kind`` request."""
    model = BODIES[kind]
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise _explained(model, data, error.errors(include_url=False)[0]) from None


def _explained(model: type[BaseModel], data: dict, error: dict) -> SchemaError:
    """The first error pydantic found, said with the field's description."""
    param, description, value = "", "", data
    for part in error["loc"]:
        fields = getattr(model, "model_fields", {})
        if isinstance(part, int) and isinstance(value, list):
            param, value = f"{param}[{part}]", value[part]
        elif isinstance(part, str) and part in fields:  # the other strings name union members
            param = f"{param}.{part}" if param else part
            description, model = fields[part].description, _model_in(fields[part].annotation)
            value = value.get(part) if isinstance(value, dict) else None
    if error["type"] == "missing":
        return SchemaError(param, f"'{param}' is required: {description}")
    if error["type"] == "extra_forbidden":
        return SchemaError(param, f"'{param}' has no field '{error['loc'][-1]}': it takes {description}")
    shown = repr(value)
    return SchemaError(param, f"'{param}' must be {description}, not {shown[:60]}{'...' if len(shown) > 60 else ''}")


def _model_in(annotation) -> type[BaseModel] | None:
    """The model a field holds (inside lists, unions and Annotated), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for inner in getattr(annotation, "__args__", ()):
        if (found := _model_in(inner)) is not None:
            return found
    return None


def openapi(title: str, version: str, model: str, max_tokens: int) -> dict:
    """The server's OpenAPI 3.1 document: its routes, with the bodies above as this server
    takes them (its one ``model``; answers of at most ``max_tokens``)."""
    _, schemas = models_json_schema([(body, "validation") for body in BODIES.values()],
                                    ref_template="#/components/schemas/{model}")
    for body in BODIES.values():
        fields = schemas["$defs"][body.__name__]["properties"]
        fields["model"]["enum"] = [model]
        for name in ("max_tokens", "max_completion_tokens"):
            next(s for s in fields[name]["anyOf"] if s.get("type") == "integer")["maximum"] = max_tokens
    error = {"description": "OpenAI's error shape: {\"error\": {message, type, param, code}}"}
    paths = {route: {"post": {
        "requestBody": {"required": True, "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{BODIES[kind].__name__}"}}}},
        "responses": {"200": {"description": "the completion, or server-sent events when stream is true"},
                      "4XX": error, "5XX": error}}} for kind, route in ROUTES.items()}
    paths["/v1/models"] = {"get": {"responses": {"200": {"description": "the one model served"}}}}
    paths["/health"] = {"get": {"security": [], "responses": {"200": {"description": "ok, and the queue's length"}}}}
    paths["/metrics"] = {"get": {"responses": {"200": {"description": "Prometheus text format"}}}}
    return {"openapi": "3.1.0", "info": {"title": title, "version": version}, "paths": paths,
            "components": {"schemas": schemas["$defs"],
                           "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
            "security": [{"bearer": []}]}
