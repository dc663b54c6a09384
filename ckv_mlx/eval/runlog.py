"""Resumable runs: an append-only JSONL of records, headed by the run's settings.

A killed run loses at most the record it was writing; started again with the same
settings it skips every record already written. Other settings are refused, so two
different runs never mix in one file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import CKVError


def _normal(value: Any) -> Any:
    return json.loads(json.dumps(value))


class RunLog:
    """Records keyed by ``record["key"]``; the first line is ``{"settings": ...}``."""

    def __init__(self, path: str | os.PathLike, settings: dict, restart: bool = False):
        self.path = Path(path)
        self.settings = _normal(settings)
        self.records: list[dict] = []
        if restart or not self.path.exists():
            self._write_header()
        else:
            self._read()

    def _write_header(self):
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps({"settings": self.settings}) + "\n", encoding="utf-8")
        except OSError as exc:
            raise CKVError(f"{self.path}: cannot write the run log ({exc.strerror or exc})") from None

    def _read(self):
        text = self.path.read_text(encoding="utf-8")
        complete, _, _ = text.rpartition("\n")
        lines = complete.split("\n") if complete else []
        try:
            header = json.loads(lines[0])["settings"] if lines else None
            records = [json.loads(line) for line in lines[1:] if line.strip()]
        except (ValueError, KeyError, TypeError):
            raise CKVError(
                f"{self.path}: not a run log of this tool; pass --restart to overwrite it or choose another file"
            ) from None
        if header != self.settings:
            changed = sorted(k for k in set(header or {}) | set(self.settings)
                             if (header or {}).get(k) != self.settings.get(k))
            raise CKVError(
                f"{self.path} holds a run with other settings ({', '.join(changed)}): "
                "pass --restart to start it over, or choose another file"
            )
        if len(complete) + 1 != len(text):  # a line cut off by a kill: drop it
            self.path.write_text(complete + "\n", encoding="utf-8")
        self.records = records

    @property
    def done(self) -> set[str]:
        return {r["key"] for r in self.records}

    def add(self, record: dict):
        """Append one record durably (flushed and synced before returning)."""
        record = _normal(record)
        with open(self.path, "a", encoding="utf-8") as out:
            out.write(json.dumps(record) + "\n")
            out.flush()
            os.fsync(out.fileno())
        self.records.append(record)
