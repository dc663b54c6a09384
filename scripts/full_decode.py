"""Full-cache decode against mlx-lm's own ``stream_generate``: many paired runs, one ratio
with its interval per context, on a machine left alone.

    .venv/bin/python scripts/full_decode.py                  # 1K..8K, 12 pairs of 48 tokens
    .venv/bin/python scripts/full_decode.py --lengths 300 --pairs 2 --decode-tokens 4 --out /tmp/f

``scripts/bench.py`` measures everything at once; this is its full-cache decode target
alone, so that enough pairs fit in the time: per context, each side reads the prompt once
(mlx-lm's prompt cache; our ``Session.prefill``), then ``--pairs`` times mlx-lm and ours
decode one after the other from that cache (see ``bench.decode_pairs``). Writes
OUT/full_decode.json and OUT/full_decode.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import bench
from ckv_mlx.model.blas import ensure_fast_blas
from report_files import write_report


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=[1000, 2000, 4000, 8000])
    p.add_argument("--pairs", type=int, default=12)
    p.add_argument("--decode-tokens", type=int, default=48)
    p.add_argument("--precision", default=None, help="float32 or native (default: $CKV_PRECISION, else the device's)")
    p.add_argument("--out", type=Path, default=Path("docs/bench/full_decode"))
    return p.parse_args(argv)


def main(argv=None) -> int:
    ensure_fast_blas()
    args = parse_args(argv)
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    from ckv_mlx.policy.methods import make_method
    from ckv_mlx.engine.session import Session

    started = time.perf_counter()
    load_args = bench.parse_args(["--precision", args.precision] if args.precision else [])
    ours, plain = bench.load(load_args), bench.load(load_args)
    session = Session(ours.model, ours.tokenizer, make_method("full")[0])
    results = {"model": ours.name, "precision": ours.precision, "device": str(mx.default_device()),
               "pairs": args.pairs, "decode_tokens": args.decode_tokens, "lengths": {}}
    for length in args.lengths:
        tokens = bench.prompt_ids(ours.tokenizer, length)
        cache = make_prompt_cache(plain.model)
        bench.mlx_lm_run(plain, tokens, 2, cache)  # reads the prompt (decode_pairs trims back)
        session.reset()
        session.prefill(tokens)
        ratios = bench.decode_pairs(plain, cache, session, tokens, args.decode_tokens, args.pairs)
        ratio, low, high = bench.median_interval(ratios)
        results["lengths"][str(length)] = {"ratios": ratios, "median": ratio, "low": low, "high": high,
                                           "mean": statistics.fmean(ratios)}
        print(f"{length} tokens: {ratio:.3f} ({low:.3f}-{high:.3f}), {time.perf_counter() - started:.0f} s",
              file=sys.stderr)
    results["seconds"] = round(time.perf_counter() - started, 1)
    worst = min(m["median"] for m in results["lengths"].values())
    results["target"] = {"limit": bench.TARGETS["full_decode_vs_mlx_lm"], "worst": worst,
                         "met": worst >= bench.TARGETS["full_decode_vs_mlx_lm"]}
    write_report(args.out, "full_decode", results, table(results))
    return 0


def table(results: dict) -> str:
    lines = [f"{results['model']} ({results['precision']}, {results['device']}), full cache, {results['pairs']} pairs of "
             f"{results['decode_tokens']} decode tokens per context; {results['seconds']:.0f} s in all.", "",
             "| context | ours / mlx-lm, median | 95 % interval | lowest - highest pair |", "|---|---|---|---|"]
    for length, m in results["lengths"].items():
        lines.append(f"| {int(length):,} | {m['median']:.3f} | {m['low']:.3f}-{m['high']:.3f} "
                     f"| {min(m['ratios']):.3f} - {max(m['ratios']):.3f} |")
    t = results["target"]
    lines += ["", f"Target: ours >= {t['limit']} of mlx-lm at every context; worst median {t['worst']:.3f}: "
              f"{'met' if t['met'] else 'missed'}."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
