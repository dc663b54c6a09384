"""The paper's published files, read where CI has them: ../shared beside the repo."""

from pathlib import Path

import pytest

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "compresskv"


def reference_file(relative: str) -> Path:
    """``REFERENCE / relative``, or skip the test saying what is missing."""
    path = REFERENCE / relative
    if not path.exists():
        pytest.skip(f"reference data not found: {path} (needs ../shared beside the repo; CI has it)")
    return path
