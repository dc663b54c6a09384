"""What ckv-serve reports at ``/metrics``, in Prometheus's text format (prometheus-client):
requests by route and status, the queue, time to first token, tokens per second, prompt
and generated tokens, the KV cache's bytes in RAM and on disk, and MLX's memory. No MLX
here: figures come from the worker (its events, its memory) and the store's manifests.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ..disk.store import list_stores

ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics", "/openapi.json")
SECONDS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
RATES = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)


class Metrics:
    """The server's figures, in a registry of their own (one per app)."""

    def __init__(self, waiting: Callable[[], int], store_dir: Path | None, memory: Callable[[], dict[str, int]]):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("ckv_requests", "HTTP requests answered, by route and status", ["route", "status"],
                                registry=registry)
        Gauge("ckv_queue_waiting", "requests waiting for the model behind the running one",
              registry=registry).set_function(waiting)
        self.first_token = Histogram("ckv_time_to_first_token_seconds", "from a request's arrival to its first token",
                                     buckets=SECONDS, registry=registry)
        self.rate = Histogram("ckv_generation_tokens_per_second", "an answer's tokens over the time that generated them",
                              buckets=RATES, registry=registry)
        self.prompt_tokens = Counter("ckv_prompt_tokens", "prompt tokens of the requests answered", registry=registry)
        self.generated_tokens = Counter("ckv_generated_tokens", "tokens generated", registry=registry)
        kv = Gauge("ckv_kv_cache_bytes", "KV cache bytes allocated: in RAM by the request being answered, on disk "
                   "by the stored prefixes", ["tier"], registry=registry)
        self.kv_ram = kv.labels("ram")
        kv.labels("disk").set_function(lambda: _store_bytes(store_dir))
        allocated = Gauge("ckv_mlx_memory_bytes", "MLX's memory: active (arrays alive), peak (since start), cache "
                          "(freed buffers kept for reuse)", ["kind"], registry=registry)
        for kind in ("active", "peak", "cache"):
            allocated.labels(kind).set_function(lambda kind=kind: memory()[kind])

    def watch(self, emit: Callable[[tuple], None]) -> Callable[[tuple], None]:
        """``emit``, recording the figures of one request's events on the way."""
        return _Watched(self, emit)

    def count(self, path: str, status: int):
        self.requests.labels(path if path in ROUTES else "other", str(status)).inc()

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def _store_bytes(store_dir: Path | None) -> int:
    return sum(s["bytes"] for s in list_stores(store_dir)) if store_dir and store_dir.is_dir() else 0


class _Watched:
    """One request's events, timed: arrival to first token; generated tokens over the
    time from its cache being ready to its end."""

    def __init__(self, metrics: Metrics, emit: Callable[[tuple], None]):
        self.metrics, self.emit = metrics, emit
        self.arrived, self.ready, self.first = time.monotonic(), None, True

    def __call__(self, event: tuple):
        now, metrics = time.monotonic(), self.metrics
        if event[0] == "ready":
            self.ready = now
            metrics.kv_ram.set(event[2])
        elif event[0] == "text" and self.first:
            metrics.first_token.observe(now - self.arrived)
            self.first = False
        elif event[0] == "done":
            usage = event[2]
            metrics.prompt_tokens.inc(usage["prompt_tokens"])
            metrics.generated_tokens.inc(usage["completion_tokens"])
            if self.ready is not None and now > self.ready:
                metrics.rate.observe(usage["completion_tokens"] / (now - self.ready))
        if event[0] in ("done", "error"):
            metrics.kv_ram.set(0)
        self.emit(event)


class CountRequests:
    """ASGI middleware: every HTTP answer counted by route and status (401s included)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counted(message):
            if message["type"] == "http.response.start":
                self.metrics.count(scope["path"], message["status"])
            await send(message)

        await self.app(scope, receive, counted)
