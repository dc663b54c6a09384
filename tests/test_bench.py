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


@pytest.mark.slow
def test_tiny_benchmark_with_the_kept_rows_quantized(tmp_path, default_model):
    command = [sys.executable, str(ROOT / "scripts" / "bench.py"), "--lengths", "300", "--budgets", "32,64",
               "--repeats", "1", "--decode-tokens", "4", "--decode-pairs", "1", "--kv-bits", "8,4", "--out", str(tmp_path)]
    subprocess.run(command, check=True, cwd=ROOT, timeout=600)
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["targets"]["kept_bytes_exact"]["met"] and "quantized_decode" in result["targets"]
    measured = result["lengths"]["300"]
    for bits in (8, 4):
        ratio, low, high = measured[f"quantized_ratios@64/{bits}"]
        assert low <= ratio <= high and len(measured["runs"][0][f"quantized_ratios@64/{bits}"]) == 2
        memory = measured["memory"][f"32/{bits}"]
        packed_row = 3 * (64 * bits // 8 + 2 * (64 // 64) * 4)  # 3 KV heads x 64 values, a float32 scale and bias
        assert memory["packed_row_bytes"] == packed_row
        layer_row = 3 * 64 * 2 * 4
        expected = sum(2 * b * packed_row + max(8, -(-b // 4)) * layer_row for b in memory["layer_budgets"])
        assert memory["kept_bytes"] == memory["formula_bytes"] == expected < measured["memory"]["32"]["kept_bytes"]
    assert "| 300 | 64 | 4 |" in (tmp_path / "bench.md").read_text()
