"""ckv-serve against faults. As users run it (a process with the built-in model, on
127.0.0.1): SIGTERM during a streamed answer, SIGKILL while a store is being written. In
a thread with a tiny model: the disk filling during a request. Every wait is bounded."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import pytest

from test_serve import MODEL, Server, body, engine_answer, chat_tokens, messages, post
from ckv_mlx.serve.worker import ServeSettings

START_S = 180  # loading the built-in model, at most
DOCUMENT = " ".join(f"Shelf {i} of the archive holds the {['maps', 'letters', 'ledgers'][i % 3]} of the year "
                    f"{1700 + i}." for i in range(80))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """``python -m ckv_mlx.serve.cli`` on a free loopback port, with ``store_dir``."""

    def __init__(self, store_dir: Path, log: Path):
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = open(log, "ab")
        command = [sys.executable, "-m", "ckv_mlx.serve.cli", "--port", self.url.rsplit(":", 1)[1],
                   "--store-dir", str(store_dir), "--budget", "64"]
        self.process = subprocess.Popen(command, stdout=self.log, stderr=self.log,
                                        env={**os.environ, "HF_HUB_OFFLINE": "1"})
        deadline = time.monotonic() + START_S
        while not self.healthy():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.skip(f"ckv-serve did not start with the built-in model (see {log})")
            time.sleep(0.2)
        with urllib.request.urlopen(self.url + "/v1/models", timeout=10) as response:
            self.model = json.loads(response.read())["data"][0]["id"]

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def waiting(self) -> int:
        with urllib.request.urlopen(self.url + "/health", timeout=5) as response:
            return json.loads(response.read())["waiting"]

    def chat(self, question: str, max_tokens: int, stream: bool = False) -> urllib.request.Request:
        payload = {"model": self.model, "messages": [{"role": "system", "content": DOCUMENT},
                                                      {"role": "user", "content": question}],
                   "max_tokens": max_tokens, "stream": stream}
        return urllib.request.Request(self.url + "/v1/chat/completions", data=json.dumps(payload).encode(),
                                      headers={"Content-Type": "application/json"}, method="POST")

    def stop(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)
        self.log.close()


def published(store_dir: Path) -> list[Path]:
    return [p.parent for p in store_dir.glob("*/manifest.json")]


def half_written(store_dir: Path) -> list[Path]:
    return list(store_dir.glob(".tmp-*"))


def assert_intact(store: Path):
    """Every file the manifest names has its size and CRC-32 (computed here, by zlib)."""
    manifest = json.loads((store / "manifest.json").read_text())
    records = [*(r for layer in manifest["layers"] for r in layer["files"].items()), *manifest["files"].items()]
    for name, record in records:
        data = (store / name).read_bytes()
        assert len(data) == record["bytes"], name
        if "crc32" in record:
            assert zlib.crc32(data) == record["crc32"], name


def test_sigterm_mid_stream_ends_the_stream_with_an_error_and_exits_0_within_5_s(tmp_path):
    stores = tmp_path / "stores"
    server = ServeProcess(stores, tmp_path / "serve.log")
    try:
        with urllib.request.urlopen(server.chat("Which shelf holds the maps of 1703?", 2), timeout=120):
            pass  # the document is stored now
        assert len(published(stores)) == 1
        lines, events, waiting = [], [], []
        with urllib.request.urlopen(server.chat("Count from 1 to 2000, separated by commas.", 1500, stream=True),
                                    timeout=120) as stream:
            for raw in stream:
                line = raw.decode().strip()
                if line.startswith("data: "):
                    events.append(line[len("data: "):])
                    lines.append(line)
                    if len(events) == 3:  # the role, then two pieces of the answer; and a request queued behind
                        queued = threading.Thread(target=lambda: waiting.append(_answer(server.chat("Hi?", 4))))
                        queued.start()
                        _until(lambda: server.waiting() == 1)
                        server.process.send_signal(signal.SIGTERM)
                        sent = time.monotonic()
        assert server.process.wait(timeout=10) == 0
        assert time.monotonic() - sent <= 5
        queued.join(10)
    finally:
        server.stop()
    assert events[-1] == "[DONE]", lines[-3:]
    error = json.loads(events[-2])["error"]
    assert error["code"] == "server_shutdown" and set(error) == {"message", "type", "param", "code"}, error
    [(status, answer)] = waiting
    assert status == 503 and answer["error"]["code"] == "server_shutdown", answer
    [store] = published(stores)
    assert_intact(store)
    assert not half_written(stores)


def test_after_sigkill_while_a_store_is_written_the_next_start_removes_it_and_reads_anew(tmp_path):
    stores, log = tmp_path / "stores", tmp_path / "serve.log"
    server = ServeProcess(stores, log)
    try:
        request = server.chat("Which shelf holds the letters of 1704?", 2)
        threading.Thread(target=lambda: _ignore_errors(request), daemon=True).start()
        _until(lambda: any(f.stat().st_size for tmp in half_written(stores) for f in tmp.iterdir()), 120)
        server.process.kill()
        server.process.wait(30)
    finally:
        server.stop()
    assert half_written(stores) and not published(stores)

    server = ServeProcess(stores, log)
    try:
        assert not half_written(stores)  # removed at start, before any request
        with urllib.request.urlopen(server.chat("Which shelf holds the letters of 1704?", 2), timeout=120) as r:
            answer = json.loads(r.read())
    finally:
        server.stop()
    assert answer["ckv"]["prefix_tokens_reused"] == 0  # read anew, nothing taken from the dead writer
    [store] = published(stores)
    assert_intact(store)


def _answer(request) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _until(condition, timeout_s: float = 10):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _ignore_errors(request):
    try:
        urllib.request.urlopen(request, timeout=120).read()
    except OSError:
        pass  # the server was killed under it


@pytest.fixture
def filling_disk(monkeypatch):
    """The store's writes fail with ENOSPC once ``room[0]`` bytes are written (a disk filling)."""
    import ckv_mlx.disk.store as store

    room = [4096]

    class Filling:
        def __init__(self, file):
            self.file = file

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def __getattr__(self, name):
            return getattr(self.file, name)

        def write(self, data):
            size = memoryview(data).nbytes
            if size > room[0]:
                raise OSError(errno.ENOSPC, "No space left on device")
            room[0] -= size
            return self.file.write(data)

    monkeypatch.setattr(store, "open", lambda path, mode="r", *a, **kw: Filling(open(path, mode, *a, **kw)),
                        raising=False)
    return room


def test_when_the_disk_fills_during_a_request_it_is_answered_from_memory_and_nothing_half_written_stays(
        tmp_path, filling_disk):
    stores = tmp_path / "stores"
    server = Server(ServeSettings(store_dir=stores))
    try:
        for question in ("Which fruit grows on row 7?", "And on row 8?"):
            chat = messages(question)
            code, _, answer = post(f"{server.url}/v1/chat/completions",
                                   json.dumps({"model": MODEL, "messages": chat, "max_tokens": 6}).encode())
            assert code == 200, answer
            expected = engine_answer(server, chat_tokens(server, chat), "snapkv", 48, 6)
            assert answer["choices"][0]["message"]["content"] == expected
            assert not half_written(stores) and not published(stores)
        filling_disk[0] = 2**40  # room again: the next request stores the document
        code, _, answer = post(f"{server.url}/v1/chat/completions", body(messages=messages("Row 9?"), max_tokens=2))
        assert code == 200 and len(published(stores)) == 1
    finally:
        server.stop()
