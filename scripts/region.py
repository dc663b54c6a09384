"""What the decode region costs and changes: the old fixed 64 rows against the default
(a quarter of each layer's budget, at least 8), on the built-in model.

    .venv/bin/python scripts/region.py                    # 2K and 4K tokens, budgets 64/128/256
    .venv/bin/python scripts/region.py --lengths 300 --budgets 64 --answer-tokens 16 --out /tmp/r

Per length: one prefill of the shipped haystack and a question, the full cache's greedy
answer; then per budget and region, from the same snapshot: KV bytes allocated, decode
speed of ``Session.generate`` over ``--answer-tokens`` tokens (EOS ignored), re-scorings
per layer per 100 tokens, and the fidelity of the full answer teacher-forced through the
compressed cache (top-1 agreement and mean KL against the full cache). Writes
OUT/region.json and OUT/region.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ckv_mlx.model.blas import ensure_fast_blas
from report_files import write_report

QUESTION = "\nQuestion: What is this text about? Answer: This text is about"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    p.add_argument("--method", default="compresskv")
    p.add_argument("--lengths", type=ints, default=[2000, 4000])
    p.add_argument("--budgets", type=ints, default=[64, 128, 256])
    p.add_argument("--answer-tokens", type=int, default=128)
    p.add_argument("--out", type=Path, default=Path("docs/region"))
    return p.parse_args(argv)


def fidelity(lp, full_lp) -> tuple[float, float]:
    import mlx.core as mx

    top1 = mx.mean(mx.argmax(lp, axis=-1) == mx.argmax(full_lp, axis=-1)).item()
    kl = mx.mean(mx.sum(mx.exp(full_lp) * (full_lp - lp), axis=-1)).item()
    return top1, max(kl, 0.0)


def compressed(session, snapshot, budget: int, region: int | None):
    """The prefilled ``snapshot`` compressed to ``budget``, each layer with ``region``."""
    session.restore(snapshot)
    for cache in session.caches:
        cache.region_setting = region
    session.compress(budget)


def measure(session, snapshot, full_lp, logits, budget, region, answer) -> dict:
    """Every figure of one budget and region, from the prefilled ``snapshot``."""
    rescores = []
    compress_layer = session._compress_layer

    def counted(layer, layer_budget):
        rescores.append(layer)
        compress_layer(layer, layer_budget)

    compressed(session, snapshot, budget, region)
    kept = session.kv_bytes
    session._compress_layer = counted
    tic = time.perf_counter()
    n = sum(1 for _ in session.generate(logits, len(answer)))
    seconds = time.perf_counter() - tic
    del session._compress_layer
    compressed(session, snapshot, budget, region)
    top1, kl = fidelity(session.teacher_force(logits, answer), full_lp)
    layers = len(session.caches)
    return {"budget": budget, "region": region or "default", "kv_bytes": kept, "decode_tps": n / seconds,
            "rescores_per_layer_per_100": 100 * len(rescores) / layers / n, "top1": top1, "kl": kl}


def main(argv=None) -> int:
    ensure_fast_blas()
    args = parse_args(argv)
    import mlx.core as mx

    from ckv_mlx.policy.methods import make_method
    from ckv_mlx.model.models import load_model
    from ckv_mlx.eval.niah import DEFAULT_HAYSTACK, load_haystack
    from ckv_mlx.profiles import resolve_profile
    from ckv_mlx.engine.session import Session

    started = time.perf_counter()
    loaded = load_model()
    loaded.tokenizer.eos_token_ids = set()
    profile, _, _ = resolve_profile(None, loaded.shape)
    method, _ = make_method(args.method, profile)
    haystack = loaded.tokenizer.encode(load_haystack(DEFAULT_HAYSTACK))
    question = loaded.tokenizer.encode(QUESTION, add_special_tokens=False)
    session = Session(loaded.model, loaded.tokenizer, method)
    rows = []
    for length in args.lengths:
        tokens = (haystack * (length // len(haystack) + 1))[: length - len(question)] + question
        session.reset()
        logits = session.prefill(tokens)
        mx.eval(logits)
        state = session.snapshot()
        answer = list(session.generate(logits, args.answer_tokens))
        session.restore(state)
        full_lp = session.teacher_force(logits, answer)
        for budget in args.budgets:
            for region in (64, None):
                row = measure(session, state, full_lp, logits, budget, region, answer)
                rows.append({"length": length, **row})
                print(f"{length} tokens, budget {budget}, region {region or 'default'}: {row}", file=sys.stderr)
    result = {"model": loaded.name, "method": method.name, "answer_tokens": args.answer_tokens,
              "seconds": round(time.perf_counter() - started, 1), "rows": rows}
    write_report(args.out, "region", result, table(result))
    return 0


def table(result: dict) -> str:
    mib = 2**20
    lines = [
        f"{result['model']}, {result['method']}, {result['answer_tokens']} answer tokens; {result['seconds']:.0f} s.",
        "",
        "| context | budget | region | KV allocated MiB | decode tok/s | re-scorings per layer per 100 tokens "
        "| top-1 vs full | KL vs full |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['length']:,} | {r['budget']} | {r['region']} | {r['kv_bytes'] / mib:.2f} "
                     f"| {r['decode_tps']:.1f} | {r['rescores_per_layer_per_100']:.1f} | {r['top1']:.3f} "
                     f"| {r['kl']:.4f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
