"""Pass-key retrieval on the default model: one prefill per depth, every method compressed
from a snapshot of it. Writes docs/passkey.json and prints a Markdown table.

    .venv/bin/python scripts/passkey.py --budget 128
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ckv_mlx.model.blas import ensure_fast_blas
from ckv_mlx.model.models import load_model
from ckv_mlx.eval.sweep import Case, sweep

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
DEPTHS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
KEY = "71432"
QUESTION = "What is the pass key? The pass key is"
METHODS = ("full", "compresskv", "compresskv-gqa", "snapkv", "pyramidkv", "streamingllm", "keydiff")


def haystack(depth: float, sentences: int = 100) -> str:
    """~2,400 tokens of filler with the key sentence at ``depth`` (0 = start)."""
    parts = [FILLER] * sentences
    parts.insert(round(depth * sentences), f"The pass key is {KEY}. Remember it. {KEY} is the pass key. ")
    return "".join(parts)


def run(budget: int = 128, methods=METHODS, depths=DEPTHS, model: str | None = None) -> dict:
    """Whether each method finds the key at each depth (completion-style prompt)."""
    loaded = load_model(model)
    cases = [Case(haystack(depth), QUESTION, KEY) for depth in depths]
    records = list(sweep(loaded, cases, list(methods), [budget], max_tokens=8))
    found = {name: [r["correct"] for r in records if r["method"] == name] for name in methods}
    kv_share = {name: max(r["kv_bytes"] / r["full_bytes"] for r in records if r["method"] == name) for name in methods}
    return {"model": loaded.name, "prompt_tokens": records[-1]["prompt_tokens"], "budget": budget, "depths": list(depths),
            "found": found, "kv_share": kv_share}


def table(result: dict) -> str:
    head = "| method | " + " | ".join(f"{d:.0%}" for d in result["depths"]) + " | found | KV allocated, % of full |"
    rule = "|---" * (len(result["depths"]) + 3) + "|"
    rows = [
        f"| {name} | " + " | ".join("yes" if f else "no" for f in hits)
        + f" | {sum(hits)}/{len(hits)} | {100 * result['kv_share'][name]:.1f} |"
        for name, hits in result["found"].items()
    ]
    return "\n".join([head, rule, *rows])


def main() -> int:
    ensure_fast_blas()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=int, default=128)
    p.add_argument("--model", default=None)
    p.add_argument("--out", type=Path, default=Path("docs/passkey.json"))
    args = p.parse_args()
    start = time.perf_counter()
    result = run(args.budget, model=args.model)
    result["seconds"] = round(time.perf_counter() - start, 1)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"\n{result['prompt_tokens']} prompt tokens, {result['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
