"""The reading run's fidelity by length, and on the documents where the full cache's own
answer is not a loop (a 270M base model asked for a summary or a list often repeats one
line; agreeing with a loop says little).

    python scripts/reading_tables.py docs/eval/gemma3-reading   # writes reading_tables.{json,md} there
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ckv_mlx.eval.report import _cell, _table, difference_table, fidelity_table, labelled, load_records, \
    method_order, modes_difference_table  # noqa: E402
from report_files import write_report  # noqa: E402

LOOP_SHARE = 0.4  # an answer whose distinct words are fewer than this share of its words is a loop
BUDGETS = ("128", "512")


def distinct_share(answer: str) -> float:
    """Distinct words over words: near 1 for prose, near 0 for one line repeated."""
    words = answer.split()
    return len(set(words)) / len(words) if words else 0.0


def full_answers(records) -> dict[str, float]:
    """Each sample's full-cache answer (query-aware: the same as query-agnostic) by its distinct share."""
    return {r["sample"]: distinct_share(r["answer"]) for r in records
            if r["method"] == "full" and r.get("mode") == "query-aware"}


def by_length(records, task: str) -> str:
    """Top-1 agreement (%) per method and mode, at the least and most budget of each length."""
    lengths = sorted({r["length"] for r in records if r["task"] == task})
    header = ["method"] + [f"{n // 1000}K, {b}" for n in lengths for b in BUDGETS]
    rows = []
    for mode in ("query-aware", "query-agnostic"):
        chosen = [r for r in records if r["task"] == task and r.get("mode") == mode and r.get("top1") is not None]
        for method in method_order(chosen):
            cells = [_cell([r for r in chosen if r["length"] == n], method, b, "top1") for n in lengths for b in BUDGETS]
            rows.append([f"{method}, {mode.removeprefix('query-')}"] + ["-" if c is None else f"{100 * c:.1f}" for c in cells])
    return _table(header, rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", type=Path, help="an eval output folder with summary and list records")
    args = p.parse_args(argv)
    records = labelled(load_records(args.folder / "records.jsonl"))
    shares = full_answers(records)
    prose = {s for s, share in shares.items() if share >= LOOP_SHARE}
    pooled = [{**r, "task": "reading"} for r in records if r["sample"] in prose]
    sections = [f"## {task}: top-1 agreement % by length\n\n{by_length(records, task)}" for task in ("summary", "list")]
    sections.append("## The full cache's answers: distinct words / words (a loop below "
                    f"{LOOP_SHARE:.0%})\n\n| sample | distinct share |\n|---|---|\n"
                    + "\n".join(f"| {s} | {share:.2f}{'' if s in prose else ' (loop)'} |" for s, share in shares.items()))
    sections.append(f"## Summary and list, the {len(prose)} documents whose full answer is not a loop, query-aware: "
                    f"top-1 agreement % / mean KL\n\n{fidelity_table(pooled, 'query-aware', 'reading')}")
    sections.append(f"Each CompressKV variant against each baseline there (points, 95 % paired bootstrap):\n\n"
                    f"{difference_table(pooled, 'reading', 'top1', 'query-aware')}")
    sections.append(f"Where query-aware selection helps there: query-aware less query-agnostic (points):\n\n"
                    f"{modes_difference_table(pooled, 'reading', 'top1')}")
    write_report(args.folder, "reading_tables", {"loop_share": LOOP_SHARE, "distinct_share": shares},
                 "\n\n".join(sections))
    return 0


if __name__ == "__main__":
    sys.exit(main())
