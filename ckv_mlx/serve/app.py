"""The HTTP side of ckv-serve (Starlette): OpenAI's routes, errors as OpenAI's JSON,
streams as server-sent events (sse-starlette). It never touches MLX: requests go to the
:class:`~ckv_mlx.serve.worker.Worker` and its events come back through an asyncio queue.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
from importlib.metadata import version

import anyio
from sse_starlette.sse import AppStatus, EventSourceResponse
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from . import protocol, schema
from .metrics import CountRequests, Metrics
from .protocol import APIError, Compression, Limits

DISCONNECT_POLL_S = 0.5  # how often a request answered whole checks that its client (and the server) is still there
RETRY_AFTER_S = 1  # what a busy server (429) tells clients to wait
SHUTDOWN_GRACE_S = 1.0  # how long a stream has, once the server is told to stop, to send its last events


def create_app(worker, model_name: str, defaults: Compression, methods, limits: Limits = Limits(),
               api_key: str | None = None) -> Starlette:
    """The server for ``worker``'s model, served as ``model_name``; with ``api_key``, every
    route but ``/health`` needs ``Authorization: Bearer <api_key>``."""
    metrics = Metrics(lambda: worker.waiting, worker.settings.store_dir, worker.memory)
    document = schema.openapi("ckv-serve", version("ckv-mlx"), model_name, limits.max_tokens)

    async def completions(request: HTTPRequest, kind: str):
        try:
            body = await _body(request, limits.max_body_bytes)
            parsed = protocol.parse(body, kind, model_name, defaults, limits.max_tokens, methods)
            _check_queue(worker.waiting, limits.max_waiting)
        except APIError as error:
            return _error(error)
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        emit = metrics.watch(lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
        job = worker.submit(parsed, emit)
        try:
            first = await _next(events, request, job)
        except asyncio.CancelledError:
            job.cancel()
            raise
        except APIError as error:  # the server is stopping
            return _error(error)
        if first is None:  # the client left while the request waited or was read
            return JSONResponse({}, status_code=499)
        if first[0] == "error":
            return _error(first[1])
        if parsed.stream:
            shutdown = anyio.Event()
            return EventSourceResponse(_stream(parsed, events, job, shutdown), ping=15, sep="\n",
                                       shutdown_event=shutdown, shutdown_grace_period=SHUTDOWN_GRACE_S)
        return await _whole(parsed, events, request, job)

    async def chat(request: HTTPRequest):
        return await completions(request, "chat")

    async def complete(request: HTTPRequest):
        return await completions(request, "completion")

    async def models(request: HTTPRequest):
        return JSONResponse({"object": "list", "data": [
            {"id": model_name, "object": "model", "created": int(time.time()), "owned_by": "ckv-mlx"}]})

    async def health(request: HTTPRequest):
        return JSONResponse({"status": "ok", "model": model_name, "waiting": worker.waiting})

    async def prometheus(request: HTTPRequest):
        body, kind = metrics.render()
        return Response(body, media_type=kind)

    async def openapi(request: HTTPRequest):
        return JSONResponse(document)

    async def http_error(request: HTTPRequest, error: HTTPException):
        code = "not_found" if error.status_code == 404 else None
        return _error(APIError(error.status_code, f"{request.method} {request.url.path}: {error.detail}", code=code))

    routes = [Route("/v1/chat/completions", chat, methods=["POST"]), Route("/v1/completions", complete, methods=["POST"]),
              Route("/v1/models", models, methods=["GET"]), Route("/health", health, methods=["GET"]),
              Route("/metrics", prometheus, methods=["GET"]), Route("/openapi.json", openapi, methods=["GET"])]
    middleware = [Middleware(CountRequests, metrics=metrics)] + ([Middleware(RequireKey, key=api_key)] if api_key else [])
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error}, middleware=middleware)


class RequireKey:
    """Answer 401, in OpenAI's shape, to a request without the server's key (``/health``
    aside); keys are compared in constant time."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] == "/health":
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = given.partition(b" ")
        if scheme.lower() != b"bearer" or not token.strip():
            error = APIError(401, "no API key: send it as the header 'Authorization: Bearer <key>'",
                             code="invalid_api_key")
        elif not hmac.compare_digest(token.strip(), self.key):
            error = APIError(401, "incorrect API key: send the key ckv-serve was started with (--api-key or "
                                  "CKV_API_KEY)", code="invalid_api_key")
        else:
            return await self.app(scope, receive, send)
        await _error(error)(scope, receive, send)


def _error(error: APIError) -> JSONResponse:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if error.status == 429 else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def _check_queue(waiting: int, limit: int):
    """Refuse (429) a request that would wait behind ``limit`` others already."""
    if waiting >= limit:
        raise APIError(429, f"the server is busy: {waiting} requests are waiting for the model (the most is {limit}); "
                            "retry shortly, or start ckv-serve with a larger --max-waiting",
                       code="server_busy", kind="rate_limit_error")


async def _body(request: HTTPRequest, limit: int) -> bytes:
    """The request body, refused (413) past ``limit`` bytes before it is all read."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body is {int(declared):,} bytes, over this server's limit of {limit:,}")
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            raise APIError(413, f"the request body is over this server's limit of {limit:,} bytes")
    return bytes(body)


async def _next(events: asyncio.Queue, request: HTTPRequest, job):
    """The job's next event; None (and the job cancelled) once the client has gone; a
    503 (the job cancelled) once the server is stopping."""
    while True:
        try:
            return await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
        except asyncio.TimeoutError:
            if AppStatus.should_exit:  # set by uvicorn's signal handler (sse-starlette's hook)
                job.cancel()
                raise _shutting_down() from None
            if await request.is_disconnected():
                job.cancel()
                return None


def _shutting_down() -> APIError:
    return APIError(503, "the server is shutting down: retry this request when it is back", code="server_shutdown",
                    kind="server_error")


async def _whole(parsed, events: asyncio.Queue, request: HTTPRequest, job) -> JSONResponse:
    pieces = []
    try:
        while (event := await _next(events, request, job)) is not None:
            if event[0] == "text":
                pieces.append(event[1])
            elif event[0] == "error":
                return _error(event[1])
            else:
                _, finish, usage, figures = event
                return JSONResponse(protocol.response(parsed, "".join(pieces), finish, usage, figures))
    except APIError as error:  # the server is stopping
        return _error(error)
    return JSONResponse({}, status_code=499)


async def _stream(parsed, events: asyncio.Queue, job, shutdown: anyio.Event):
    """Server-sent events in OpenAI's chunk format, ending ``[DONE]``; a client that
    disconnects cancels its job (the generator is closed); a server told to stop ends the
    stream with an error event."""
    try:
        if parsed.kind == "chat":
            yield {"data": json.dumps(protocol.chunk(parsed, first=True))}
        while True:
            event = await _event_or_shutdown(events, shutdown)
            if event is None:
                yield {"data": json.dumps(_shutting_down().body())}
                break
            if event[0] == "text":
                yield {"data": json.dumps(protocol.chunk(parsed, event[1]))}
            elif event[0] == "error":
                yield {"data": json.dumps(event[1].body())}
                break
            else:
                _, finish, usage, figures = event
                yield {"data": json.dumps(protocol.chunk(parsed, finish=finish))}
                if parsed.include_usage:
                    yield {"data": json.dumps(protocol.usage_chunk(parsed, usage, figures))}
                break
        yield {"data": "[DONE]"}
    finally:
        job.cancel()


async def _event_or_shutdown(events: asyncio.Queue, shutdown: anyio.Event):
    """The job's next event, or None once the server is stopping."""
    if shutdown.is_set():
        return None
    event, stop = asyncio.ensure_future(events.get()), asyncio.ensure_future(shutdown.wait())
    done, pending = await asyncio.wait({event, stop}, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    return event.result() if event in done else None


class BackgroundServer:
    """``app`` served by uvicorn on a free loopback port, in a thread (tests, benchmarks)."""

    def __init__(self, app, host: str = "127.0.0.1", timeout_s: float = 30):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.05)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)
