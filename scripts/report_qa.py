"""Questions about the sample report under each method and budget, on the default model.
Prefills the document once. Writes docs/report_qa.json and prints a Markdown table.

    .venv/bin/python scripts/report_qa.py
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ckv_mlx.model.blas import ensure_fast_blas
from ckv_mlx.text.documents import read_document
from ckv_mlx.model.models import load_model
from ckv_mlx.eval.sweep import Case, sweep

QUESTIONS = [  # completion style: the default model answers these far better than chat style
    ("Who is the chief executive officer? Answer: The chief executive officer is", "Helena Marsh"),
    ("Who is the chief financial officer? Answer: The chief financial officer is", "Okafor"),
    ("What was the total revenue in 2025? Answer: Total revenue in 2025 was", "412.6"),
    ("Which product line grew fastest? Answer: The fastest-growing product line was", "Orchard Crisps"),
    ("In which city did the new plant open? Answer: The new plant opened in", "Yakima"),
    ("How many full-time employees does the company have? Answer: The company has", "2,140"),
]
METHODS = ["full", "compresskv", "compresskv-gqa", "snapkv", "pyramidkv", "streamingllm", "keydiff"]
BUDGETS = [128, 512, 1024]


def table(records: list[dict]) -> str:
    columns = [("full", None)] + [(m, b) for m in METHODS[1:] for b in BUDGETS]
    head = "| question | " + " | ".join(m if b is None else f"{m} {b}" for m, b in columns) + " |"
    rule = "|---" * (len(columns) + 1) + "|"
    rows = []
    for index, (question, expected) in enumerate(QUESTIONS):
        cells = [next(r for r in records if (r["case"], r["method"], r["budget"]) == (index, m, b)) for m, b in columns]
        rows.append(f"| {expected} | " + " | ".join("yes" if c["correct"] else "no" for c in cells) + " |")
    totals = [sum(r["correct"] for r in records if (r["method"], r["budget"]) == c) for c in columns]
    rows.append("| **correct** | " + " | ".join(f"**{t}/{len(QUESTIONS)}**" for t in totals) + " |")
    shares = [max(r["kv_bytes"] / r["full_bytes"] for r in records if (r["method"], r["budget"]) == c) for c in columns]
    rows.append("| *KV allocated, % of full* | " + " | ".join(f"{100 * s:.1f}" for s in shares) + " |")
    return "\n".join([head, rule, *rows])


def main() -> int:
    ensure_fast_blas()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--doc", type=Path, default=Path("samples/report.pdf"))
    p.add_argument("--out", type=Path, default=Path("docs/report_qa.json"))
    args = p.parse_args()
    start = time.perf_counter()
    document = read_document(args.doc)
    cases = [Case(document, f"Question: {q}", expected) for q, expected in QUESTIONS]
    records = list(sweep(load_model(), cases, METHODS, BUDGETS))
    seconds = round(time.perf_counter() - start, 1)
    args.out.write_text(json.dumps({"doc": str(args.doc), "seconds": seconds, "records": records}, indent=2) + "\n")
    print(table(records))
    print(f"\n{records[0]['prompt_tokens']} prompt tokens, {seconds} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
