"""What a group costs against one process: the built-in SmolLM2 answering one question
over a document, alone and split by heads over 3 local ranks (``mlx.launch --backend
ring`` on 127.0.0.1), side by side in one run.

    .venv/bin/python scripts/group_cost.py --out docs/group

Each run is ``python -m ckv_mlx.generate --json``, as users run it; the figures are its
report's: the answer, prefill and decode speed, KV bytes kept (the group's, summed, and
per rank) and peak memory per rank. Writes OUT/group_cost.json and OUT/group_cost.md.
Ranks on one machine share its cores, so the times say what the ring costs here, not what
two Macs gain.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCUMENT = ROOT / "ckv_mlx" / "data" / "haystack" / "01-learning-a-craft.txt"
QUESTION = "What does the essay say about learning a craft?"
MIB = 2**20


def run(ranks: int, max_tokens: int) -> dict:
    """One generate run over ``ranks`` processes: its report and wall time."""
    command = [sys.executable, "-m", "ckv_mlx.generate", "--doc", str(DOCUMENT), "--prompt", QUESTION,
               "--max-tokens", str(max_tokens), "--no-store", "--json"]
    if ranks > 1:
        command = [str(Path(sys.executable).with_name("mlx.launch")), "--backend", "ring", "-n", str(ranks), *command]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=ROOT,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        sys.exit(f"{ranks} ranks failed:\n{done.stderr[-2000:]}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    return {**report, "ranks": ranks, "wall_s": time.perf_counter() - start}


def table(runs: list[dict]) -> str:
    rows = ["| processes | answer (first 60 characters) | prefill tok/s | decode tok/s | KV kept, MiB (per rank) "
            "| peak memory per rank, MiB | wall s |", "|---|---|---|---|---|---|---|"]
    for r in runs:
        per_rank = r.get("kv_bytes_kept_per_rank", [r["kv_bytes_kept"]])
        peak = r.get("peak_memory_bytes_per_rank", [r["peak_memory_bytes"]])
        rows.append(f"| {r['ranks']} | {r['text'][:60]!r} | {r['prefill_tps']:.0f} | {r['decode_tps']:.1f} | "
                    f"{r['kv_bytes_kept'] / MIB:.2f} ({' + '.join(f'{b / MIB:.2f}' for b in per_rank)}) | "
                    f"{' / '.join(f'{b / MIB:.0f}' for b in peak)} | {r['wall_s']:.1f} |")
    return "\n".join(rows)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("docs/group"))
    p.add_argument("--ranks", default="1,3", help="group sizes to run (default 1,3: SmolLM2's 3 KV heads)")
    p.add_argument("--max-tokens", type=int, default=32)
    args = p.parse_args()
    runs = [run(int(n), args.max_tokens) for n in args.ranks.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "group_cost.json").write_text(json.dumps(runs, indent=1))
    (args.out / "group_cost.md").write_text(table(runs) + "\n")
    print(table(runs))


if __name__ == "__main__":
    main()
