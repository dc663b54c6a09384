"""ckv-serve measured through the openai client: a repeated document prefix, and a load.

    .venv/bin/python scripts/serve_reuse.py                       # documents of 2K, 4K, 8K tokens
    .venv/bin/python scripts/serve_reuse.py --lengths 600 --requests 10 --out /tmp/s

The server runs in this process (the built-in model, float32, compresskv at --budget) on
127.0.0.1, with a fresh store folder. Per length: a system message holding the document
and a question, streamed: time to the first token with nothing stored (the document is
read and stored), then with another question (its prefix is found in the store: only
the question is read, against the stored rows), then the first question again (the
answer must be the first one's). Then the load: --clients threads send --requests
requests in all (short documents, ten questions in turn); every answer must equal the
same request's answer sent alone, and MLX's active memory must come back to its idle
level. Writes OUT/serve_reuse.json and OUT/serve_reuse.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ckv_mlx.model.blas import ensure_fast_blas
from report_files import write_report

TARGET = 0.10  # the second request's time to first token, as a share of the first's, at 4K


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=[2000, 4000, 8000])
    p.add_argument("--budget", default="128")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=50)
    p.add_argument("--out", type=Path, default=Path("docs/serve"))
    return p.parse_args(argv)


def streamed(client, model: str, messages: list[dict], max_tokens: int = 8) -> tuple[float, str]:
    """Seconds to the first content chunk, and the whole answer."""
    start, first, text = time.perf_counter(), None, ""
    for chunk in client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, stream=True):
        piece = chunk.choices[0].delta.content if chunk.choices else None
        if piece and first is None:
            first = time.perf_counter() - start
        text += piece or ""
    return (first if first is not None else time.perf_counter() - start), text


def main(argv=None) -> int:
    ensure_fast_blas()
    args = parse_args(argv)
    import mlx.core as mx
    import openai

    from ckv_mlx.policy.methods import METHODS
    from ckv_mlx.model.models import load_model
    from ckv_mlx.eval.niah import DEFAULT_HAYSTACK, load_haystack
    from ckv_mlx.profiles import resolve_profile
    from ckv_mlx.serve.app import BackgroundServer, create_app
    from ckv_mlx.serve.protocol import Compression, Limits
    from ckv_mlx.serve.worker import ServeSettings, Worker

    started = time.perf_counter()
    loaded = load_model(None, "float32")
    profile, _, _ = resolve_profile(None, loaded.shape)
    haystack = loaded.tokenizer.encode(load_haystack(DEFAULT_HAYSTACK))
    results = {"model": loaded.name, "method": "compresskv", "budget": args.budget, "lengths": {}}
    with tempfile.TemporaryDirectory(prefix="ckv-serve-") as root:
        worker = Worker(loaded, profile, ServeSettings(store_dir=Path(root)))
        app = create_app(worker, loaded.name, Compression("compresskv", args.budget), list(METHODS), Limits(512, 2**26))
        http = BackgroundServer(app)
        client = openai.OpenAI(base_url=f"{http.url}/v1", api_key="unused", max_retries=0, timeout=600)
        try:
            for length in args.lengths:
                document = loaded.tokenizer.decode((haystack * (length // len(haystack) + 1))[:length])
                system = {"role": "system", "content": document}
                cold, first = streamed(client, loaded.name, [system, {"role": "user", "content": "What is this about?"}])
                warm, _ = streamed(client, loaded.name, [system, {"role": "user", "content": "Who wrote it?"}])
                again, repeat = streamed(client, loaded.name, [system, {"role": "user", "content": "What is this about?"}])
                results["lengths"][str(length)] = {"first_ttft_s": cold, "second_ttft_s": warm, "third_ttft_s": again,
                                                   "same_answer": repeat == first}
                print(f"{length} tokens done ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
            results["load"] = load(client, loaded.name, haystack, loaded.tokenizer, args, mx)
        finally:
            http.stop()
            worker.close()
    results["seconds"] = round(time.perf_counter() - started, 1)
    write_report(args.out, "serve_reuse", results, table(results))
    return 0


def load(client, model: str, haystack: list[int], tokenizer, args, mx) -> dict:
    """--requests requests from --clients threads against the same requests sent alone."""
    document = tokenizer.decode(haystack[:600])
    chats = [[{"role": "system", "content": document}, {"role": "user", "content": f"What is point {i}?"}]
             for i in range(10)]

    def ask(chat) -> str:
        return client.chat.completions.create(model=model, messages=chat, max_tokens=6).choices[0].message.content

    alone = [ask(chat) for chat in chats]
    mx.synchronize()
    idle = mx.get_active_memory()
    failures, start = 0, time.perf_counter()

    def one(i: int) -> bool:
        try:
            return ask(chats[i % len(chats)]) == alone[i % len(chats)]
        except Exception:  # a failed request is counted, not raised
            return False

    with ThreadPoolExecutor(args.clients) as pool:
        same = list(pool.map(one, range(args.requests)))
    seconds = time.perf_counter() - start
    time.sleep(0.5)
    mx.synchronize()
    failures = same.count(False)
    return {"clients": args.clients, "requests": args.requests, "failed_or_different": failures, "seconds": seconds,
            "idle_bytes": idle, "after_bytes": mx.get_active_memory()}


def table(results: dict) -> str:
    lines = [f"{results['model']}, {results['method']} at budget {results['budget']}, through the openai client; "
             f"{results['seconds']:.0f} s in all.", "",
             "| document tokens | 1st request, to 1st token s | 2nd (another question), s | 2nd / 1st | target "
             "| 1st question again, s | same answer |", "|---|---|---|---|---|---|---|"]
    for length, r in results["lengths"].items():
        ratio = r["second_ttft_s"] / r["first_ttft_s"]
        target = f"<= {TARGET}" if length == "4000" else "-"
        lines.append(f"| {int(length):,} | {r['first_ttft_s']:.2f} | {r['second_ttft_s']:.2f} | {ratio:.3f} | {target} "
                     f"| {r['third_ttft_s']:.2f} | {'yes' if r['same_answer'] else 'no'} |")
    load = results["load"]
    lines += ["", "| clients | requests | failed or not as alone | wall s | MLX active MiB idle | after |",
              "|---|---|---|---|---|---|",
              f"| {load['clients']} | {load['requests']} | {load['failed_or_different']} | {load['seconds']:.1f} "
              f"| {load['idle_bytes'] / 2**20:.1f} | {load['after_bytes'] / 2**20:.1f} |"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
