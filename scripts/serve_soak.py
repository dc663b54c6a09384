"""ckv-serve soaked on 127.0.0.1: many clients, for minutes, every kind of request.

    .venv/bin/python scripts/serve_soak.py                     # 16 clients x 50 requests, 10 minutes at least
    .venv/bin/python scripts/serve_soak.py --clients 2 --requests 10 --minutes 0 --out /tmp/soak

ckv-serve runs as users run it: a process with the built-in model, an API key, a fresh
--store-dir under a --store-limit that the documents overflow (so stores are pruned while
others are read). First every good request is sent alone, one after another: its answer
is the reference. Then each of --clients threads sends --requests requests at least, for
--minutes at least, each one drawn (seeded) from: a question on one of four long shared
documents; the next turn of a growing conversation; a streamed answer cut off after its
first piece; a bad body; a wrong key. Checks: no 5xx; every good answer equal to its
reference; MLX's active memory back to its idle level; the store folder never above
--store-limit (sampled every 0.5 s); the server's threads and open files (from /proc,
Linux) no more after than before. Writes OUT/serve_soak.json and OUT/serve_soak.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

from report_files import write_report

KEY = "sk-soak"
DOCUMENTS = ["financial/01-northwind-orchards.txt", "legal/01-", "manual/03-sequence-types.txt", "code/03-heapq.txt"]
QUESTIONS = ["What is this document about?", "Name one number it gives.", "Who or what is it for?",
             "What is the first section called?", "Summarise it in five words."]
TURNS = ["What is this document about?", "Give one detail from it.", "And another one?"]
BAD_BODIES = [b"{not json", b"[1, 2]", b'{"model": "MODEL", "messages": []}', b'{"model": "gpt-4o", "messages": '
              b'[{"role": "user", "content": "Hi"}]}', b'{"model": "MODEL", "messages": [{"role": "user", '
              b'"content": "\\ud800"}]}', b'{"model": "MODEL", "messages": [{"role": "user", "content": "Hi"}], '
              b'"max_tokens": 100000000}', b'{"model": "MODEL", "messages": [{"role": "robot", "content": "x"}]}',
              b'{"model": "MODEL", "messages": [{"role": "user", "content": "Hi"}], "temperature": "hot"}']
KINDS = {"question": 35, "conversation": 25, "cut_stream": 15, "bad_body": 15, "wrong_key": 10}
MAX_TOKENS = 8


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=50, help="requests per client, at least")
    p.add_argument("--minutes", type=float, default=10, help="the soak's length, at least")
    p.add_argument("--document-chars", type=int, default=4000, help="each shared document's length (~4 per token)")
    p.add_argument("--store-limit-mib", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("docs/serve"))
    return p.parse_args(argv)


class Soaked:
    """The server process, and how to ask it."""

    def __init__(self, store_dir: Path, store_limit: int, log: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(log, "wb")
        command = [sys.executable, "-m", "ckv_mlx.serve.cli", "--port", str(port), "--api-key", KEY,
                   "--store-dir", str(store_dir), "--store-limit", str(store_limit), "--max-waiting", "64"]
        self.process = subprocess.Popen(command, stdout=self.log, stderr=self.log, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        deadline = time.monotonic() + 300
        while self.call("GET", "/health")[0] != 200:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"ckv-serve did not start: see {log}")
            time.sleep(0.5)
        self.model = json.loads(self.call("GET", "/v1/models")[1])["data"][0]["id"]

    def call(self, method: str, path: str, body: bytes | None = None, key: str = KEY) -> tuple[int, bytes]:
        request = urllib.request.Request(self.url + path, data=body, method=method, headers={
            "Content-Type": "application/json", "Authorization": f"Bearer {key}"})
        try:
            with urllib.request.urlopen(request, timeout=600) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()
        except OSError as error:  # not up yet, or gone
            return 0, str(error).encode()

    def chat(self, messages: list[dict], key: str = KEY) -> tuple[int, str | None]:
        body = json.dumps({"model": self.model, "messages": messages, "max_tokens": MAX_TOKENS}).encode()
        status, raw = self.call("POST", "/v1/chat/completions", body, key)
        return status, json.loads(raw)["choices"][0]["message"]["content"] if status == 200 else None

    def cut_stream(self, messages: list[dict]) -> int:
        """A streamed answer, its connection closed after the first piece of text."""
        body = json.dumps({"model": self.model, "messages": messages, "max_tokens": 64, "stream": True}).encode()
        request = urllib.request.Request(self.url + "/v1/chat/completions", data=body, method="POST", headers={
            "Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
        try:
            with urllib.request.urlopen(request, timeout=600) as response:
                for line in response:
                    if line.startswith(b"data: ") and b'"content"' in line and b'"role"' not in line:
                        break
                return response.status
        except urllib.error.HTTPError as error:
            return error.code

    def metrics(self) -> dict[str, float]:
        """``/metrics``'s samples that have at most one label, by ``name`` or ``name{value}``."""
        figures = {}
        for line in self.call("GET", "/metrics")[1].decode().splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                figures[name.replace('"', "")] = float(value)
        return figures

    def resources(self) -> dict[str, int | None]:
        """The process's threads and open files (Linux's /proc; None elsewhere)."""
        proc = Path(f"/proc/{self.process.pid}")
        if not proc.exists():
            return {"threads": None, "open_files": None}
        threads = next(int(line.split()[1]) for line in (proc / "status").read_text().splitlines()
                       if line.startswith("Threads:"))
        return {"threads": threads, "open_files": len(os.listdir(proc / "fd"))}

    def stop(self) -> int:
        self.process.terminate()
        code = self.process.wait(60)
        self.log.close()
        return code


def stored_bytes(root: Path) -> int:
    """The published stores' bytes, counted on disk (manifests aside)."""
    total = 0
    for folder in list(root.iterdir()) if root.is_dir() else []:
        if folder.is_dir() and not folder.name.startswith(".") and (folder / "manifest.json").is_file():
            try:
                total += sum(f.stat().st_size for f in folder.iterdir() if f.name != "manifest.json")
            except FileNotFoundError:  # pruned while counted
                pass
    return total


def documents(chars: int) -> list[str]:
    root = Path(__file__).resolve().parent.parent / "ckv_mlx" / "data" / "documents"
    return [next(root.glob(f"{name}*")).read_text()[:chars] for name in DOCUMENTS]


def conversation(document: str, turn: int, answers: list[str]) -> list[dict]:
    """The messages of turn ``turn`` (0-based) of the conversation on ``document``."""
    messages = [{"role": "system", "content": document}]
    for k in range(turn):
        messages += [{"role": "user", "content": TURNS[k]}, {"role": "assistant", "content": answers[k]}]
    return messages + [{"role": "user", "content": TURNS[turn]}]


def main(argv=None) -> int:
    args = parse_args(argv)
    docs = documents(args.document_chars)
    limit = args.store_limit_mib * 2**20
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ckv-soak-") as folder:
        stores = Path(folder) / "stores"
        server = Soaked(stores, limit, Path(folder) / "serve.log")
        asked = [(d, q) for d in range(len(docs)) for q in range(len(QUESTIONS))]
        reference = {}
        for d, q in asked:
            reference[("question", d, q)] = server.chat(question_messages(docs[d], q))[1]
        chains = {}
        for d, doc in enumerate(docs):
            chains[d] = []
            for turn in range(len(TURNS)):
                chains[d].append(server.chat(conversation(doc, turn, chains[d]))[1])
        print(f"references: {len(reference) + sum(map(len, chains.values()))} requests alone "
              f"({time.perf_counter() - started:.0f} s)", file=sys.stderr)
        time.sleep(1)
        idle = {**server.resources(), "active_bytes": server.metrics()["ckv_mlx_memory_bytes{kind=active}"]}

        counts, wrong, lock = Counter(), [], threading.Lock()
        peak_store, sampling = [0], threading.Event()

        def sample():
            while not sampling.wait(0.5):
                peak_store[0] = max(peak_store[0], stored_bytes(stores))

        def client(number: int):
            rng = random.Random(args.seed * 1000 + number)
            turn, soak_end = 0, time.monotonic() + 60 * args.minutes
            sent = 0
            while sent < args.requests or time.monotonic() < soak_end:
                sent += 1
                kind = rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
                d = rng.randrange(len(docs))
                if kind == "question":
                    q = rng.randrange(len(QUESTIONS))
                    status, text = server.chat(question_messages(docs[d], q))
                    good = status == 200 and text == reference[("question", d, q)]
                elif kind == "conversation":
                    d = number % len(docs)
                    status, text = server.chat(conversation(docs[d], turn, chains[d]))
                    good = status == 200 and text == chains[d][turn]
                    turn = (turn + 1) % len(TURNS)
                elif kind == "cut_stream":
                    status = server.cut_stream(question_messages(docs[d], rng.randrange(len(QUESTIONS))))
                    good = status == 200
                elif kind == "bad_body":
                    body = rng.choice(BAD_BODIES).replace(b"MODEL", server.model.encode())
                    status = server.call("POST", "/v1/chat/completions", body)[0]
                    good = 400 <= status < 500
                else:
                    status = server.chat(question_messages(docs[d], 0), key="sk-wrong")[0]
                    good = status == 401
                with lock:
                    counts[(kind, status)] += 1
                    if not good:
                        wrong.append({"client": number, "kind": kind, "status": status})

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        soak_start = time.perf_counter()
        threads = [threading.Thread(target=client, args=(n,)) for n in range(args.clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        soak_s = time.perf_counter() - soak_start
        sampling.set()
        sampler.join()
        time.sleep(2)
        figures = server.metrics()
        after = {**server.resources(), "active_bytes": figures["ckv_mlx_memory_bytes{kind=active}"]}
        exit_code = server.stop()
    result = {
        "clients": args.clients, "requests_per_client_at_least": args.requests, "minutes_at_least": args.minutes,
        "seconds": round(soak_s, 1), "requests": sum(counts.values()),
        "by_kind_and_status": {f"{k} {s}": n for (k, s), n in sorted(counts.items())},
        "server_errors": sum(n for (_, s), n in counts.items() if s >= 500 or s == 0),
        "not_as_expected": len(wrong), "first_not_as_expected": wrong[:20],
        "store_limit_bytes": limit, "store_peak_bytes": peak_store[0], "idle": idle, "after": after,
        "server_exit_code": exit_code, "total_seconds": round(time.perf_counter() - started, 1),
    }
    write_report(args.out, "serve_soak", result, table(result))
    return 0 if not wrong and result["server_errors"] == 0 else 1


def question_messages(document: str, question: int) -> list[dict]:
    return [{"role": "system", "content": document}, {"role": "user", "content": QUESTIONS[question]}]


def table(r: dict) -> str:
    kinds = Counter()
    for label, n in r["by_kind_and_status"].items():
        kinds[label.split()[0]] += n
    mib = 2**20
    lines = [f"{r['clients']} clients, {r['requests']:,} requests in {r['seconds'] / 60:.1f} min "
             f"({', '.join(f'{k} {n}' for k, n in kinds.items())}).", "",
             "| check | before | after / found | pass |", "|---|---|---|---|",
             f"| 5xx or no answer | - | {r['server_errors']} | {'yes' if r['server_errors'] == 0 else 'no'} |",
             f"| answers not as expected (good ones not equal to the reference; statuses) | - | {r['not_as_expected']} "
             f"| {'yes' if r['not_as_expected'] == 0 else 'no'} |",
             f"| MLX active memory, MiB | {r['idle']['active_bytes'] / mib:.1f} | {r['after']['active_bytes'] / mib:.1f} "
             f"| {'yes' if r['after']['active_bytes'] <= r['idle']['active_bytes'] else 'no'} |",
             f"| store folder, MiB (limit {r['store_limit_bytes'] / mib:.0f}) | - | peak {r['store_peak_bytes'] / mib:.1f} "
             f"| {'yes' if r['store_peak_bytes'] <= r['store_limit_bytes'] else 'no'} |"]
    for name in ("threads", "open_files"):
        before, after = r["idle"][name], r["after"][name]
        ok = "n/a" if before is None else "yes" if after <= before else "no"
        lines.append(f"| server {name.replace('_', ' ')} | {before} | {after} | {ok} |")
    lines.append(f"| server exit code after SIGTERM | - | {r['server_exit_code']} | "
                 f"{'yes' if r['server_exit_code'] == 0 else 'no'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
