"""Bounded-memory prefill on a document whose full cache is 10x the KV memory limit.

    .venv/bin/python scripts/bounded_prefill.py

Reads one needle prompt (shipped haystack, needle at 50 %) on the built-in model twice:
whole, then compressed (the full cache exists until compression); and in chunks under a
KV limit of a tenth of the full cache, each chunk scored by the question read after it,
as generate does by itself when the full cache would not fit. Reports the most KV bytes
held at any moment (exact, from the cache), MLX's peak memory over prefill, compression
and decode, and both answers.
Writes docs/bounded_prefill.json and docs/bounded_prefill.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ckv_mlx.model.blas import ensure_fast_blas


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--length", type=int, default=8000, help="prompt tokens (default 8000)")
    p.add_argument("--ratio", type=float, default=10, help="full cache / KV limit (default 10)")
    p.add_argument("--budget", type=int, default=128)
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--out", type=Path, default=Path("docs/bounded_prefill"))
    return p.parse_args(argv)


def read(session, tokens, budget, working, chunk, tokenizer, question=None) -> dict:
    import mlx.core as mx

    session.reset()
    mx.clear_cache()
    start = time.perf_counter()
    logits = session.prefill(tokens, working_budget=working, chunk=chunk, question=question)
    session.compress(budget)
    answer = tokenizer.decode(list(session.generate(logits, 8)))
    s = session.stats
    return {"working_budget": working, "prefill_s": round(time.perf_counter() - start - s.decode_s, 1),
            "peak_kv_bytes": s.peak_kv_bytes, "kept_bytes": s.kv_bytes_kept, "peak_memory_bytes": s.peak_memory_bytes,
            "answer": answer}


def main(argv=None) -> int:
    ensure_fast_blas()
    args = parse_args(argv)
    from ckv_mlx.kv.cache import allocated_rows
    from ckv_mlx.engine.memory import plan_prefill, weight_bytes
    from ckv_mlx.policy.methods import make_method
    from ckv_mlx.model.models import load_model
    from ckv_mlx.eval.niah import exact_match, load_haystack, load_needles, needle_prompt
    from ckv_mlx.profiles import resolve_profile
    from ckv_mlx.engine.session import Session

    loaded = load_model()
    profile, _, _ = resolve_profile(None, loaded.shape)
    session = Session(loaded.model, loaded.tokenizer, make_method("compresskv", profile)[0])
    needle = load_needles()[0]
    prompt = needle_prompt(loaded.tokenizer, load_haystack(), [needle], args.length, [50])
    tokens = prompt.document + prompt.question
    full = allocated_rows(len(tokens)) * loaded.kv_bytes_per_token
    limit = int(full / args.ratio)
    working, note = plan_prefill(loaded, len(tokens), args.budget, str(limit), args.chunk)
    print(f"note: {note}", file=sys.stderr)
    runs = {"whole": read(session, tokens, args.budget, None, args.chunk, loaded.tokenizer),
            "chunked": read(session, tokens, args.budget, working, args.chunk, loaded.tokenizer, prompt.question)}
    for run in runs.values():
        run["found"] = exact_match(run["answer"], needle)
    result = {"model": loaded.name, "method": "compresskv", "prompt_tokens": len(tokens), "budget": args.budget,
              "chunk": args.chunk, "full_kv_bytes": full, "kv_limit_bytes": limit,
              "weights_bytes": weight_bytes(loaded.model), "runs": runs,
              "under_limit": runs["chunked"]["peak_kv_bytes"] <= limit}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    text = table(result)
    args.out.with_suffix(".md").write_text(text + "\n")
    print(text)
    return 0


def table(r: dict) -> str:
    mib = 2**20
    lines = [
        f"{r['model']}, compresskv at budget {r['budget']}, {r['prompt_tokens']:,}-token needle prompt: full cache "
        f"{r['full_kv_bytes'] / mib:.1f} MiB, KV limit {r['kv_limit_bytes'] / mib:.1f} MiB, weights "
        f"{r['weights_bytes'] / mib:.0f} MiB.",
        "",
        "| prefill | working budget | most KV held MiB | under the limit | kept MiB | MLX peak MiB | peak - weights MiB "
        "| prefill s | answer | found |",
        "|---" * 10 + "|",
    ]
    for name, run in r["runs"].items():
        lines.append(
            f"| {name} | {run['working_budget'] or '-'} | {run['peak_kv_bytes'] / mib:.1f} "
            f"| {'yes' if run['peak_kv_bytes'] <= r['kv_limit_bytes'] else 'no'} | {run['kept_bytes'] / mib:.2f} "
            f"| {run['peak_memory_bytes'] / mib:.0f} | {(run['peak_memory_bytes'] - r['weights_bytes']) / mib:.0f} "
            f"| {run['prefill_s']} | {run['answer'].strip()!r} | {'yes' if run['found'] else 'no'} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
