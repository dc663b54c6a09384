"""The one error type users see: a clear, one-line message saying what to do."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable


class CKVError(Exception):
    """Bad input or an unsupported setup; the message is shown to the user as is."""


def exit_code(command: Callable[[], int | None]) -> int:
    """Run a CLI command: a CKVError becomes one ``error:`` line and exit code 2."""
    try:
        return command() or 0
    except CKVError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def read_jsonl(path: str | Path, what: str) -> list[tuple[int, object]]:
    """``(line number, value)`` for every non-blank line; one-line errors otherwise."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise CKVError(f"{path}: cannot read the {what} ({exc.__class__.__name__})") from None
    rows = []
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                rows.append((number, json.loads(line)))
            except ValueError:
                raise CKVError(f"{path}, line {number}: not valid JSON") from None
    if not rows:
        raise CKVError(f"{path}: no {what} in the file")
    return rows
