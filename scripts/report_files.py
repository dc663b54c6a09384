"""What every measurement script writes: its figures as JSON and its table as Markdown."""

from __future__ import annotations

import json
from pathlib import Path


def write_report(out: Path, name: str, result: dict, table: str):
    """``OUT/NAME.json`` (every figure) and ``OUT/NAME.md`` (the table); the table also to stdout."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"{name}.md").write_text(table + "\n")
    print(table)
