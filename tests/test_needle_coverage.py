"""scripts/needle_coverage.py counts, per token of a needle, the caches that keep it:
checked against StreamingLLM, whose kept rows follow from its definition alone."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SINKS, LAYERS, KV_HEADS = 4, 30, 3


@pytest.mark.slow
def test_streamingllm_keeps_only_the_sinks_of_a_needle_at_the_start(tmp_path, default_model):
    command = [sys.executable, str(ROOT / "scripts" / "needle_coverage.py"), "--haystack",
               str(ROOT / "ckv_mlx" / "data" / "haystack"), "--length", "400", "--depth", "0", "--needle", "2",
               "--budget", "32", "--methods", "streamingllm", "--span", "sentence", "--out", str(tmp_path)]
    subprocess.run(command, check=True, cwd=ROOT, timeout=600)
    result = json.loads((tmp_path / "niah-L400-D0-N2-32-sentence.json").read_text())
    assert "".join(result["span_tokens"]).strip() == "The password to the observatory archive is cobalt lantern."
    kept = result["methods"]["streamingllm"]["kept"]
    expected = [LAYERS * KV_HEADS if p < SINKS else 0 for p in result["span_positions"]]
    assert result["span_positions"][0] == 0
    assert [sum(layer[i] for layer in kept) for i in range(len(expected))] == expected
    assert "| streamingllm | 90 | 90 | 90 | 90 | 0 |" in (tmp_path / "niah-L400-D0-N2-32-sentence.md").read_text()
    readers = result["readers"]
    assert readers and all(0.1 <= h["share"] <= 1 for h in readers)
    assert all(h["srh"] == (h["srh_rank"] <= result["first_k"]) for h in readers)
