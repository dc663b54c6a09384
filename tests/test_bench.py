"""scripts/bench.py in miniature: it runs, writes its files and checks its targets (the
timings themselves are reported, never asserted)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_tiny_benchmark(tmp_path, default_model):
    command = [sys.executable, str(ROOT / "scripts" / "bench.py"), "--lengths", "200,300", "--budgets", "32,64",
               "--repeats", "1", "--decode-tokens", "4", "--out", str(tmp_path)]
    subprocess.run(command, check=True, cwd=ROOT, timeout=600)
    result = json.loads((tmp_path / "bench.json").read_text())
    assert set(result["targets"]) == {"prefill_overhead", "compress_share", "decode_vs_ideal", "memory_excess",
                                      "kept_bytes_exact"}
    assert result["targets"]["kept_bytes_exact"]["met"]
    row = 30 * 3 * 64 * 2 * 4  # bytes per token of the built-in model's full cache
    for length in ("200", "300"):
        memory = result["lengths"][length]["memory"]
        assert memory["full_bytes"] == int(length) * row
        assert memory["32"]["kept_bytes"] == 32 * row and memory["64"]["kept_bytes"] == 64 * row
    table = (tmp_path / "bench.md").read_text()
    assert "| 300 | 64 |" in table and "| kept_bytes_exact | equal | - | yes |" in table
    assert (tmp_path / "bench.png").stat().st_size > 0
