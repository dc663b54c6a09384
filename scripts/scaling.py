"""Past the built-in models' context, by simulation: a tiny random model whose RoPE takes
128K positions, read with the bounded prefill into the disk store, then one question
selected from disk.

    .venv/bin/python scripts/scaling.py                                # 8K to 128K tokens
    .venv/bin/python scripts/scaling.py --lengths 2000,4000 --out /tmp/scaling

Per length (random tokens, one process, one length after the other): the time to read the
document in chunks that compress as they go while every row goes to a new store (the KV
limit set to a small fraction of the full cache), the store's bytes, the most KV bytes the
read held (exact, from the caches), then a 32-token question selected from the store: its
time and MLX's peak over it, against the target of the kept cache, one layer's full rows
and one chunk of rows (and, beside it, that plus the question's attention scores over every
row, float32: what a selection allocates that is not KV). The full cache's bytes beside
each. The read's peak KV must stay flat with the length (set by the limit), the
selection's peak follow one layer and the selection's time grow at most linearly. Writes OUT/scaling.json, OUT/scaling.md and OUT/scaling.png.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from ckv_mlx.model.blas import ensure_fast_blas
from report_files import write_report

MODEL = dict(model_type="llama", hidden_size=128, num_hidden_layers=4, intermediate_size=256, num_attention_heads=4,
             num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-5, vocab_size=512, rope_theta=500000.0,
             max_position_embeddings=131072, tie_word_embeddings=True)


class Tokens:
    """What a session asks of a tokenizer, for random tokens."""

    eos_token_ids: set[int] = set()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")],
                   default=[8192, 16384, 32768, 65536, 131072])
    p.add_argument("--method", default="snapkv")
    p.add_argument("--budget", type=int, default=128)
    p.add_argument("--kv-limit", default="4MiB", help="the KV memory limit of the read (default 4MiB: 2 %% of the "
                   "full cache at 8K, 0.1 %% at 128K)")
    p.add_argument("--out", type=Path, default=Path("docs/scaling"))
    return p.parse_args(argv)


def measure(session, loaded, tokens: list[int], question: list[int], args, root: Path) -> dict:
    import mlx.core as mx

    from ckv_mlx.disk.disk_cache import DiskFullCache
    from ckv_mlx.disk.store import CONVERSATIONS, StoreWriter
    from ckv_mlx.engine.memory import plan_prefill
    from ckv_mlx.engine.session import PREFILL_STEP
    from ckv_mlx.kv.cache import allocated_rows

    session.reset()
    mx.clear_cache()
    working, _ = plan_prefill(loaded, len(tokens), args.budget, args.kv_limit, PREFILL_STEP)
    writer = StoreWriter(root, f"doc-{len(tokens)}", len(session.caches))
    start = time.perf_counter()
    session.prefill(tokens, working_budget=working, store=writer)
    read_s = time.perf_counter() - start
    read_peak_kv = session.stats.peak_kv_bytes
    full = DiskFullCache(writer.publish(session.remembered_queries(), session.others), root / CONVERSATIONS)
    session.forget_rows()
    mx.clear_cache()
    held = mx.get_active_memory()
    mx.reset_peak_memory()
    start = time.perf_counter()
    logits = session.reselect(question, full, args.budget)
    mx.eval(logits)
    reselect_s = time.perf_counter() - start
    peak_over = mx.get_peak_memory() - held
    kept = session.kv_bytes
    target = kept + full.layer_bytes + PREFILL_STEP * loaded.kv_bytes_per_token // len(session.caches)
    result = {
        "tokens": len(tokens), "working_budget": working, "read_s": round(read_s, 2), "read_tok_s": round(len(tokens) / read_s),
        "read_peak_kv_bytes": read_peak_kv, "store_bytes": full.nbytes,
        "full_cache_bytes": loaded.kv_bytes_per_token * allocated_rows(len(tokens) + len(question)),
        "reselect_s": round(reselect_s, 3), "reselect_peak_bytes": peak_over, "kept_bytes": kept,
        "target_bytes": target,
        "scores_bytes": 4 * len(question) * MODEL["num_attention_heads"] * (full.tokens + len(question)),
    }
    full.close()
    return result


def main(argv=None) -> int:
    ensure_fast_blas()
    args = parse_args(argv)
    import mlx.core as mx
    from mlx_lm.models import llama

    from ckv_mlx.engine.session import Session
    from ckv_mlx.model.models import LoadedModel, model_shape
    from ckv_mlx.policy.methods import make_method

    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs.from_dict(MODEL))
    mx.eval(model.parameters())
    loaded = LoadedModel(model, Tokens(), "tiny-128k", model_shape(model, "tiny-128k"), 131072, identity="tiny-128k")
    session = Session(model, Tokens(), make_method(args.method)[0])
    rows, started = [], time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ckv-scaling-") as root:
        for length in args.lengths:
            tokens = mx.random.randint(1, MODEL["vocab_size"], (length,)).tolist()
            question = mx.random.randint(1, MODEL["vocab_size"], (32,)).tolist()
            rows.append(measure(session, loaded, tokens, question, args, Path(root)))
            print(f"{length:,} tokens: {rows[-1]} ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    result = {"model": MODEL, "method": args.method, "budget": args.budget, "kv_limit": args.kv_limit, "rows": rows,
              "seconds": round(time.perf_counter() - started, 1)}
    write_report(args.out, "scaling", result, table(result))
    plot(rows, args.out / "scaling.png")
    return 0


def table(r: dict) -> str:
    mib = 2**20
    lines = [f"A random llama ({r['model']['num_hidden_layers']} layers, {r['model']['num_key_value_heads']} KV heads "
             f"x {r['model']['head_dim']}), {r['method']} at budget {r['budget']}, KV limit {r['kv_limit']}; "
             f"{r['seconds']:.0f} s in all.", "",
             "| tokens | full cache MiB | read s | read tok/s | most KV held while reading MiB | store MiB "
             "| selection s | MLX peak over the selection MiB | target (kept + 1 layer + 1 chunk) MiB "
             "| + the question's attention scores MiB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        lines.append(f"| {row['tokens']:,} | {row['full_cache_bytes'] / mib:.1f} | {row['read_s']:.1f} "
                     f"| {row['read_tok_s']:,} | {row['read_peak_kv_bytes'] / mib:.2f} | {row['store_bytes'] / mib:.1f} "
                     f"| {row['reselect_s']:.2f} | {row['reselect_peak_bytes'] / mib:.1f} | {row['target_bytes'] / mib:.1f} "
                     f"| {(row['target_bytes'] + row['scores_bytes']) / mib:.1f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens = [r["tokens"] for r in rows]
    mib = 2**20
    fig, (memory, speed) = plt.subplots(1, 2, figsize=(11, 4))
    memory.loglog(tokens, [r["full_cache_bytes"] / mib for r in rows], "k--", label="full cache")
    memory.loglog(tokens, [r["read_peak_kv_bytes"] / mib for r in rows], "o-", label="most KV held while reading")
    memory.loglog(tokens, [r["reselect_peak_bytes"] / mib for r in rows], "s-", label="MLX peak over a selection")
    memory.loglog(tokens, [r["target_bytes"] / mib for r in rows], ":", label="kept + one layer + one chunk")
    memory.set(xlabel="document tokens", ylabel="MiB", title="Memory")
    memory.legend(fontsize=8)
    speed.loglog(tokens, [r["reselect_s"] for r in rows], "s-", label="selection from disk")
    first = rows[0]
    speed.loglog(tokens, [first["reselect_s"] * t / first["tokens"] for t in tokens], "k:", label="linear")
    speed.set(xlabel="document tokens", ylabel="seconds", title="Selecting for a question")
    speed.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
