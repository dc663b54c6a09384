"""The KV memory an eval's compressed caches allocate, as a share of a full cache's, from
its records: prompt lengths, methods and budgets, with the cache's allocation rule (each
layer: its budget + a region of a quarter of it, at least 8 rows; a full cache: 256-row
steps). tests/test_cache.py checks that rule against MLX's active memory.

    .venv/bin/python scripts/allocated_share.py docs/eval/niah/records.jsonl

For records made before memory figures were allocated bytes (their kv_fraction counts
rows held). Prints a Markdown table: mean share per prompt length and budget, per method.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from ckv_mlx.kv.cache import allocated_rows, default_region
from ckv_mlx.errors import CKVError, read_jsonl
from ckv_mlx.policy.methods import make_method
from ckv_mlx.profiles import default_profile_path, load_profile


def allocated_share(method, budget: int, tokens: int, layers: int) -> float:
    """Rows a compressed cache of ``tokens`` allocates over a full cache's, all layers."""
    budgets = method.layer_budgets(budget, layers)
    if tokens <= budget:  # kept whole, each layer at least its budget
        budgets = [max(b, tokens) for b in budgets]
    kept = sum(b + default_region(b) for b in budgets)
    return kept / (layers * allocated_rows(tokens))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("records", type=Path)
    p.add_argument("--model", default="smollm2-135m-instruct")
    args = p.parse_args(argv)
    profile = load_profile(default_profile_path(args.model))
    layers = profile.shape.layers
    rows = [r for _, r in read_jsonl(args.records, "records") if isinstance(r, dict) and r.get("budget")]
    if not rows:
        raise CKVError(f"{args.records}: no compressed records")
    methods = sorted({r["method"] for r in rows})
    cells: dict[tuple, list[float]] = {}
    for r in rows:
        method = make_method(r["method"], profile)[0]
        share = allocated_share(method, int(r["budget"]), r["prompt_tokens"], layers)
        cells.setdefault((r["length"], int(r["budget"]), r["method"]), []).append(share)
    budgets = sorted({b for _, b, _ in cells})
    print("| length | method | " + " | ".join(f"{b}" for b in budgets) + " |")
    print("|---" * (len(budgets) + 2) + "|")
    for length in sorted({n for n, _, _ in cells}):
        for m in methods:
            shares = [cells.get((length, b, m)) for b in budgets]
            print(f"| {length:,} | {m} | " + " | ".join(f"{100 * statistics.mean(s):.1f}" if s else "-" for s in shares) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
