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
               "--repeats", "1", "--decode-tokens", "4", "--decode-pairs", "2", "--out", str(tmp_path)]
    subprocess.run(command, check=True, cwd=ROOT, timeout=600)
    result = json.loads((tmp_path / "bench.json").read_text())
    assert set(result["targets"]) == {"prefill_overhead", "compress_share", "full_decode_vs_mlx_lm", "decode_vs_ideal",
                                      "memory_excess", "kept_bytes_exact"}
    assert result["targets"]["kept_bytes_exact"]["met"]
    for measured in result["lengths"].values():
        assert len(measured["runs"][0]["full_decode_ratios"]) == 3  # the repeat's own pair and 2 more
        ratio, low, high = measured["full_decode_ratio"]
        assert low <= ratio <= high
    layer_row = 3 * 64 * 2 * 4  # one token of one layer of the built-in model: 3 KV heads x 64, K and V, float32
    for length, rows in (("200", 256), ("300", 512)):  # the full cache grows in steps of 256 rows
        memory = result["lengths"][length]["memory"]
        assert memory["full_bytes"] == 30 * rows * layer_row
        for budget in ("32", "64"):
            budgets = memory[budget]["layer_budgets"]
            assert sum(budgets) == 30 * int(budget)
            allocated = sum(b + max(8, -(-b // 4)) for b in budgets)  # each layer: budget + a quarter, >= 8
            assert memory[budget]["kept_bytes"] == allocated * layer_row
            assert memory[budget]["rows_bytes"] == 30 * int(budget) * layer_row
    table = (tmp_path / "bench.md").read_text()
    assert "| 300 | 64 |" in table and "| kept_bytes_exact | equal | - | yes |" in table
    assert (tmp_path / "bench.png").stat().st_size > 0
