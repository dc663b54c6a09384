"""The one MLX thread shared by the chat engine and the server: jobs in order, cancelled
jobs leave the queue and stop between prefill chunks, and MLX's streams are freed on the
thread before it ends (else the process aborts at exit)."""

from __future__ import annotations

import threading
import time

import mlx.core as mx

from ckv_mlx.policy.methods import METHODS
from ckv_mlx.engine.runtime import MLXThread
from ckv_mlx.serve import protocol
from ckv_mlx.serve.worker import ServeSettings, Worker
from fakes import fake_profile
from test_serve import DEFAULTS, MODEL, loaded_tiny


def freed_on(monkeypatch) -> list[str]:
    """The names of the threads that call ``mx.clear_streams`` from now on."""
    threads = []
    real = mx.clear_streams
    monkeypatch.setattr(mx, "clear_streams", lambda: (threads.append(threading.current_thread().name), real()))
    return threads


def test_the_servers_worker_frees_mlx_streams_on_its_own_thread_at_close(monkeypatch):
    threads = freed_on(monkeypatch)
    loaded = loaded_tiny()
    worker = Worker(loaded, fake_profile(loaded.model), ServeSettings())
    worker.close()
    assert threads == ["ckv-serve-mlx"]


def test_the_chat_engine_frees_them_too(monkeypatch):
    from ckv_mlx.chat.engine import ChatEngine, ChatSettings

    threads = freed_on(monkeypatch)
    ChatEngine(ChatSettings(), lambda event: None).close()
    assert threads == ["ckv-engine"]


def test_cancelled_jobs_leave_the_queue_and_never_run():
    started, release, ran = threading.Event(), threading.Event(), []
    mlx = MLXThread("test-mlx")
    mlx.submit(lambda job: (started.set(), release.wait(30)))
    assert started.wait(30)
    waiting = [mlx.submit(lambda job, i=i: ran.append(i)) for i in range(3)]
    waiting[1].cancel()
    assert mlx.waiting == 2
    release.set()
    mlx.close(timeout=30)
    assert ran == [0, 2]


def completion(words: int, max_tokens: int = 4) -> protocol.Request:
    prompt = " ".join(f"word{i}" for i in range(words))
    body = f'{{"model": "{MODEL}", "prompt": "{prompt}", "max_tokens": {max_tokens}}}'.encode()
    return protocol.parse(body, "completion", MODEL, DEFAULTS, 512, list(METHODS))


def test_a_cancelled_request_stops_its_prefill_between_chunks(monkeypatch):
    loaded = loaded_tiny()
    worker = Worker(loaded, fake_profile(loaded.model), ServeSettings())
    model_class, calls, jobs = type(loaded.model), [], []
    real_call = model_class.__call__

    def counted(self, *args, **kwargs):  # the client leaves once the first chunk is read
        calls.append(args[0].shape[1])
        while not jobs:
            time.sleep(0.001)
        jobs[0].cancel()
        return real_call(self, *args, **kwargs)

    events = []
    monkeypatch.setattr(model_class, "__call__", counted)
    request = completion(700)
    assert 4 * 512 < len(loaded.tokenizer.encode(request.prompt)) < loaded.context_length - 4
    jobs.append(worker.submit(request, events.append))
    deadline = time.monotonic() + 60
    while not calls and time.monotonic() < deadline:
        time.sleep(0.01)
    worker.close()
    assert calls == [512] and events == [], events



def test_the_servers_waiting_count_leaves_out_cancelled_requests():
    loaded = loaded_tiny()
    worker = Worker(loaded, fake_profile(loaded.model), ServeSettings())
    running, release = threading.Event(), threading.Event()

    def hold(event):  # the running request's first event keeps the MLX thread until released
        running.set()
        release.wait(60)

    try:
        worker.submit(completion(10), hold)
        assert running.wait(60)
        gone, _ = worker.submit(completion(10), lambda e: None), worker.submit(completion(10), lambda e: None)
        gone.cancel()
        assert worker.waiting == 1
    finally:
        release.set()
        worker.close()
