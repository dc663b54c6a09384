"""Speed and memory of ckv-mlx against mlx-lm's own generate, side by side in one process.

    .venv/bin/python scripts/bench.py                       # 1K..8K, budgets 64/128/256
    .venv/bin/python scripts/bench.py --lengths 300 --budgets 64 --repeats 1 --decode-tokens 8 --out /tmp/b

For each context length, each repeat runs mlx-lm and ours one after the other on the same
prompt: ``mlx_lm.stream_generate`` at that context; our public path (``Session.prefill``
then ``Session.generate``) with the full cache; then, for each budget, compression and
``Session.generate`` with the compressed cache, and ``stream_generate`` on a prompt the
size of the budget (the ideal). Both are timed the same way, as their consumer sees
them: prefill = time to the first token, decode = tokens after the first per second.
EOS is ignored, so every run decodes the same number of tokens. Figures are medians
over the repeats. The full-cache decode ratio, a few percent against a run-to-run spread
as large, also gets ``--decode-pairs`` more paired runs per repeat on the caches already
filled, and is the median of every pair's ratio with a bootstrap 95 % interval. Memory during decode is measured in a child process that holds only
our model and the compressed cache. With ``--kv-bits 8,4``, each budget's compressed
cache also decodes with its kept rows quantized, in ``1 + --decode-pairs`` pairs against
the unquantized one (quantized / unquantized tok/s, median and interval), and the child
checks each quantized cache's bytes against the formula. Writes OUT/bench.json,
OUT/bench.md, OUT/bench.png.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from ckv_mlx.model.blas import ensure_fast_blas
from report_files import write_report

TARGETS = {
    "prefill_overhead": 0.03,  # window scoring adds at most 3 % to prefill time
    "compress_share": 0.02,  # compressing takes at most 2 % of the prefill time
    "full_decode_vs_mlx_lm": 0.97,  # with the full cache, decode >= 97 % of mlx-lm's at every length
    "decode_vs_ideal": 0.90,  # at 8K, decode >= 90 % of mlx-lm at the budget's context
    "memory_excess": 0.10,  # decode peak within 10 % of weights + kept cache + activations
    "quantized_decode": 0.90,  # decode with the kept rows quantized >= 90 % of unquantized, this CPU
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    p.add_argument("--model", default=None, help="mlx-lm model folder or hub id (default: built-in)")
    p.add_argument("--precision", default=None, help="float32 or native (default: $CKV_PRECISION, else the device's)")
    p.add_argument("--method", default="compresskv")
    p.add_argument("--lengths", type=ints, default=[1000, 2000, 4000, 8000])
    p.add_argument("--budgets", type=ints, default=[64, 128, 256])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--decode-tokens", type=int, default=80, help="tokens per decode run (default 80: several evictions)")
    p.add_argument("--decode-pairs", type=int, default=4,
                   help="extra paired full-cache decode runs per repeat, mlx-lm then ours (default 4)")
    p.add_argument("--kv-bits", type=ints, default=[], help="also decode with the kept rows quantized to these bits, "
                   "e.g. 8,4 (default: none)")
    p.add_argument("--out", type=Path, default=Path("docs/bench"))
    p.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def prompt_ids(tokenizer, length: int) -> list[int]:
    """``length`` tokens of the shipped haystack (repeated if short)."""
    from ckv_mlx.eval.niah import DEFAULT_HAYSTACK, load_haystack

    ids = tokenizer.encode(load_haystack(DEFAULT_HAYSTACK))
    return (ids * (length // len(ids) + 1))[:length]


def load(args):
    """The model, with EOS switched off so that every run decodes ``--decode-tokens``."""
    from ckv_mlx.model.models import load_model

    loaded = load_model(args.model, args.precision)
    loaded.tokenizer.eos_token_ids = set()
    return loaded


def consume(start) -> tuple[float, float]:
    """Run ``start()`` and drain the tokens it streams: (seconds to the first token,
    tokens after the first per second)."""
    tic = time.perf_counter()
    count = 0
    for _ in start():
        now = time.perf_counter()
        if count == 0:
            first_s, first = now - tic, now
        count += 1
    return first_s, (count - 1) / (now - first)


def mlx_lm_run(loaded, tokens: list[int], n: int, cache=None) -> tuple[float, float]:
    """mlx-lm's own ``stream_generate`` (greedy, our prefill step): (prefill s, decode tok/s)."""
    from mlx_lm import stream_generate

    from ckv_mlx.engine.session import PREFILL_STEP

    return consume(lambda: stream_generate(loaded.model, loaded.tokenizer, tokens, max_tokens=n,
                                           prefill_step_size=PREFILL_STEP, prompt_cache=cache))


def decode_pairs(plain, cache, session, tokens: list[int], n: int, pairs: int) -> list[float]:
    """Ours / mlx-lm full-cache decode speed, ``pairs`` times, on the caches already
    filled: each pair trims both back to the prompt less its last token, which mlx-lm's
    ``stream_generate`` and ours then each read as a one-token prompt before decoding."""
    ratios = []
    for _ in range(pairs):
        for c in (*cache, *session.caches):
            c.trim(c.offset - (len(tokens) - 1))
        plain_tps = mlx_lm_run(plain, tokens[-1:], n, cache)[1]
        ours_tps = consume(lambda: session.generate(session.feed(tokens[-1:]), n))[1]
        ratios.append(ours_tps / plain_tps)
    return ratios


def median_interval(values: list[float], resamples: int = 2000) -> tuple[float, float, float]:
    """The median and its percentile-bootstrap 95 % interval."""
    import numpy as np

    values = np.asarray(values)
    draws = np.random.default_rng(0).choice(values, (resamples, len(values)))
    low, high = np.percentile(np.median(draws, axis=1), [2.5, 97.5])
    return float(np.median(values)), float(low), float(high)


def step_transient(model, cache, token: int) -> int:
    """Bytes one decode step allocates beyond what is already held (activations)."""
    import mlx.core as mx

    mx.clear_cache()
    held = mx.get_active_memory()
    mx.reset_peak_memory()
    mx.eval(model(mx.array([[token]]), cache=cache))
    return mx.get_peak_memory() - held


def quantized_ratios(session, snapshot, logits, budget: int, kv_bits, n: int, pairs: int) -> list[float]:
    """Quantized / unquantized decode speed of the cache compressed to ``budget``,
    ``pairs`` times, each pair compressed afresh from ``snapshot``."""
    ratios = []
    for _ in range(pairs):
        speeds = []
        for bits in (None, kv_bits):
            session.restore(snapshot)
            session.kv_bits = bits
            session.compress(budget)
            speeds.append(consume(lambda: session.generate(logits, n))[1])
        ratios.append(speeds[1] / speeds[0])
    session.kv_bits = None
    return ratios


def one_repeat(plain, session, full_method, method, tokens, budgets, n, pairs, kv_bits=()) -> dict:
    """mlx-lm and ours at one context, interleaved; every figure of one repeat."""
    from mlx_lm.models.cache import make_prompt_cache

    row = {}
    plain_cache = make_prompt_cache(plain.model)
    row["plain_prefill_s"], row["plain_decode_tps"] = mlx_lm_run(plain, tokens, n, plain_cache)
    session.reset()
    session.method = full_method
    row["full_prefill_s"], row["full_decode_tps"] = consume(lambda: session.generate(session.prefill(tokens), n))
    row["full_decode_ratios"] = [row["full_decode_tps"] / row["plain_decode_tps"],
                                 *decode_pairs(plain, plain_cache, session, tokens, n, pairs)]
    del plain_cache
    session.reset()
    session.method = method
    logits = session.prefill(tokens)
    row["ours_prefill_s"] = session.stats.prefill_s
    snapshot = session.snapshot()
    for budget in budgets:
        session.restore(snapshot)
        session.compress(budget)
        row[f"compress_s@{budget}"] = session.stats.compress_s
        row[f"ours_decode_tps@{budget}"] = consume(lambda: session.generate(logits, n))[1]
        ideal = make_prompt_cache(plain.model)
        row[f"ideal_decode_tps@{budget}"] = mlx_lm_run(plain, tokens[:budget], n, ideal)[1]
        row[f"activations@{budget}"] = step_transient(plain.model, ideal, tokens[0])
        for bits in kv_bits:
            row[f"quantized_ratios@{budget}/{bits.bits}"] = quantized_ratios(session, snapshot, logits, budget, bits,
                                                                             n, 1 + pairs)
    return row


def main(argv=None) -> int:
    ensure_fast_blas()
    args = parse_args(argv)
    if args.memory_child:
        return memory_child(args)
    import mlx.core as mx

    from ckv_mlx.engine.memory import weight_bytes
    from ckv_mlx.policy.methods import make_method
    from ckv_mlx.profiles import resolve_profile
    from ckv_mlx.kv.quantized import KVBits
    from ckv_mlx.engine.session import Session

    started = time.perf_counter()
    ours, plain = load(args), load(args)
    profile, _, _ = resolve_profile(None, ours.shape)
    method, _ = make_method(args.method, profile)
    full = make_method("full")[0]
    session = Session(ours.model, ours.tokenizer, method)
    results = {"model": ours.name, "method": method.name, "precision": ours.precision, "device": str(mx.default_device()),
               "decode_tokens": args.decode_tokens, "repeats": args.repeats, "decode_pairs": args.decode_pairs,
               "weights_bytes": weight_bytes(ours.model), "kv_bits": args.kv_bits, "lengths": {}}
    kv_bits = [KVBits(b) for b in args.kv_bits]
    for length in args.lengths:
        tokens = prompt_ids(ours.tokenizer, length)
        repeats = [one_repeat(plain, session, full, method, tokens, args.budgets, args.decode_tokens,
                              args.decode_pairs, kv_bits) for _ in range(args.repeats)]
        paired = [k for k in repeats[0] if k == "full_decode_ratios" or k.startswith("quantized_ratios@")]
        medians = {k: statistics.median(r[k] for r in repeats) for k in repeats[0] if k not in paired}
        for key in paired:  # the median of every pair's ratio, with its interval
            name = "full_decode_ratio" if key == "full_decode_ratios" else key
            medians[name] = median_interval([x for r in repeats for x in r[key]])
        medians["runs"] = repeats
        medians["memory"] = run_memory_child(args, length)
        results["lengths"][str(length)] = medians
        gc.collect()
        mx.clear_cache()
        print(f"{length} tokens done ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    results["seconds"] = round(time.perf_counter() - started, 1)
    results["targets"] = check_targets(results, args.budgets)
    write(results, args)
    return 0


def run_memory_child(args, length: int) -> dict:
    """Decode memory per budget, measured in a fresh process (see :func:`memory_child`)."""
    command = [sys.executable, __file__, "--memory-child", str(length), "--method", args.method,
               "--budgets", ",".join(map(str, args.budgets)), "--decode-tokens", str(args.decode_tokens)]
    command += ["--kv-bits", ",".join(map(str, args.kv_bits))] * bool(args.kv_bits)
    command += ["--model", args.model] * bool(args.model) + ["--precision", args.precision] * bool(args.precision)
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def memory_child(args) -> int:
    """Prefill once, then for each budget (largest first) compress, free everything
    else and decode: MLX's peak and the process RSS while only the weights and the kept
    cache are held; then the smallest budget's cache with its kept rows quantized."""
    from ckv_mlx.kv.cache import default_region
    from ckv_mlx.policy.methods import make_method
    from ckv_mlx.profiles import resolve_profile
    from ckv_mlx.kv.quantized import KVBits
    from ckv_mlx.engine.session import Session

    loaded = load(args)
    profile, _, _ = resolve_profile(None, loaded.shape)
    session = Session(loaded.model, loaded.tokenizer, make_method(args.method, profile)[0])
    logits = session.prefill(prompt_ids(loaded.tokenizer, args.memory_child))
    out = {"full_bytes": session.stats.kv_bytes_full}
    for budget in sorted(args.budgets, reverse=True):
        budgets = session.compress(budget)
        kept = session.kv_bytes
        formula = sum((b + default_region(b)) * c.row_bytes for b, c in zip(budgets, session.caches))
        out[str(budget)] = {**decode_memory(session, logits, args.decode_tokens), "kept_bytes": kept,
                            "formula_bytes": formula, "rows_bytes": session.stats.kv_rows_kept, "layer_budgets": budgets}
    for bits in args.kv_bits:  # the smallest budget's rows, quantized
        kv_bits, budget = KVBits(bits), min(args.budgets)
        budgets = session.layer_budgets(budget)
        session.kv_bits = kv_bits
        session.compress(budget)
        kept = session.kv_bytes
        formula = sum(2 * b * kv_bits.row_bytes(c.keys.shape[1], c.keys.shape[3], c.keys.dtype)
                      + default_region(b) * c.row_bytes for b, c in zip(budgets, session.caches))
        out[f"{budget}/{bits}"] = {**decode_memory(session, logits, args.decode_tokens), "kept_bytes": kept,
                                   "formula_bytes": formula, "rows_bytes": session.stats.kv_rows_kept,
                                   "layer_budgets": budgets,
                                   "packed_row_bytes": kv_bits.row_bytes(session.caches[0].keys.shape[1],
                                                                         session.caches[0].keys.shape[3],
                                                                         session.caches[0].keys.dtype)}
    print(json.dumps(out))
    return 0


def decode_memory(session, logits, n: int) -> dict:
    """Decode ``n`` tokens from the compressed cache with everything else freed: MLX's
    peak, the KV allocated after, the process RSS."""
    import mlx.core as mx

    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()
    for _ in session.generate(logits, n):
        pass
    return {"peak_bytes": mx.get_peak_memory(), "allocated_kv_bytes": session.kv_bytes, "rss_bytes": _rss()}


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # macOS: bytes


def check_targets(results: dict, budgets: list[int]) -> dict:
    """Each target of the benchmark, with the worst measured value and met or not."""
    lengths = results["lengths"]
    overhead = max(m["full_prefill_s"] / m["plain_prefill_s"] - 1 for m in lengths.values())
    full_speed = min(m["full_decode_ratio"][0] for m in lengths.values())
    share = max(m[f"compress_s@{b}"] / m["ours_prefill_s"] for m in lengths.values() for b in budgets)
    longest = lengths[max(lengths, key=int)]
    speed = min(longest[f"ours_decode_tps@{b}"] / longest[f"ideal_decode_tps@{b}"] for b in budgets)
    excess, exact = 0.0, True
    for m in lengths.values():
        for b in budgets:
            mem = m["memory"][str(b)]
            expected = results["weights_bytes"] + mem["allocated_kv_bytes"] + m[f"activations@{b}"]
            excess = max(excess, mem["peak_bytes"] / expected - 1)
        exact &= all(mem["kept_bytes"] == mem["formula_bytes"] for key, mem in m["memory"].items() if key != "full_bytes")
    quantized = [m[key][0] for m in lengths.values() for key in m if key.startswith("quantized_ratios@")]
    if quantized:
        worst = min(quantized)
        targets = {"quantized_decode": {"worst": worst, "limit": TARGETS["quantized_decode"],
                                        "met": worst >= TARGETS["quantized_decode"]}}
    else:
        targets = {}
    return {**targets,
        "prefill_overhead": {"worst": overhead, "limit": TARGETS["prefill_overhead"], "met": overhead <= TARGETS["prefill_overhead"]},
        "compress_share": {"worst": share, "limit": TARGETS["compress_share"], "met": share <= TARGETS["compress_share"]},
        "full_decode_vs_mlx_lm": {"worst": full_speed, "limit": TARGETS["full_decode_vs_mlx_lm"],
                                  "met": full_speed >= TARGETS["full_decode_vs_mlx_lm"]},
        "decode_vs_ideal": {"worst": speed, "limit": TARGETS["decode_vs_ideal"], "met": speed >= TARGETS["decode_vs_ideal"]},
        "memory_excess": {"worst": excess, "limit": TARGETS["memory_excess"], "met": excess <= TARGETS["memory_excess"]},
        "kept_bytes_exact": {"met": exact},
    }


def write(results: dict, args):
    write_report(args.out, "bench", results, table(results, args.budgets))
    plot(results, args.budgets, args.out / "bench.png")


def table(results: dict, budgets: list[int]) -> str:
    mib = 2**20
    lines = [
        f"{results['model']} ({results['precision']}, {results['device']}), {results['method']}, medians of "
        f"{results['repeats']} interleaved repeats, {results['decode_tokens']} decode tokens; "
        f"{results['seconds']:.0f} s in all. mlx-lm = `mlx_lm.stream_generate`; ours = `Session.generate`.",
        "",
        f"| context | decode mlx-lm tok/s | decode ours, full cache tok/s | ours / mlx-lm, median of "
        f"{results['repeats'] * (1 + results['decode_pairs'])} pairs | 95 % interval |",
        "|---|---|---|---|---|",
    ]
    for length, m in results["lengths"].items():
        ratio, low, high = m["full_decode_ratio"]
        lines.append(f"| {int(length):,} | {m['plain_decode_tps']:.1f} | {m['full_decode_tps']:.1f} "
                     f"| {ratio:.3f} | {low:.3f}-{high:.3f} |")
    lines += [
        "",
        "| context | budget | prefill mlx-lm s | prefill ours s | overhead | compress ms | % of prefill "
        "| decode mlx-lm tok/s | decode ours tok/s | decode ideal tok/s | ours / ideal | KV kept MiB (allocated) "
        "| of which rows MiB | KV full MiB | decode peak MiB | expected MiB | RSS MiB |",
        "|---" * 17 + "|",
    ]
    for length, m in results["lengths"].items():
        full = m["memory"]["full_bytes"]
        for b in budgets:
            mem = m["memory"][str(b)]
            expected = results["weights_bytes"] + mem["allocated_kv_bytes"] + m[f"activations@{b}"]
            lines.append(
                f"| {int(length):,} | {b} | {m['plain_prefill_s']:.2f} | {m['full_prefill_s']:.2f} "
                f"| {100 * (m['full_prefill_s'] / m['plain_prefill_s'] - 1):+.1f} % "
                f"| {1000 * m[f'compress_s@{b}']:.1f} | {100 * m[f'compress_s@{b}'] / m['ours_prefill_s']:.2f} % "
                f"| {m['plain_decode_tps']:.1f} | {m[f'ours_decode_tps@{b}']:.1f} | {m[f'ideal_decode_tps@{b}']:.1f} "
                f"| {m[f'ours_decode_tps@{b}'] / m[f'ideal_decode_tps@{b}']:.2f} | {mem['kept_bytes'] / mib:.2f} "
                f"| {mem['rows_bytes'] / mib:.2f} | {full / mib:.1f} | {mem['peak_bytes'] / mib:.0f} | {expected / mib:.0f} | {mem['rss_bytes'] / mib:.0f} |"
            )
    if results.get("kv_bits"):
        lines += ["", f"Kept rows quantized: decode speed against the same budget unquantized "
                      f"({results['repeats'] * (1 + results['decode_pairs'])} pairs), and the bytes kept.", "",
                  "| context | budget | bits | quantized / unquantized decode, median | 95 % interval "
                  "| KV kept MiB, unquantized | KV kept MiB, quantized (budget " + str(min(budgets)) + ") "
                  "| bytes per kept token, keys or values | formula exact |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for length, m in results["lengths"].items():
            for b in budgets:
                for bits in results["kv_bits"]:
                    ratio, low, high = m[f"quantized_ratios@{b}/{bits}"]
                    mem = m["memory"].get(f"{b}/{bits}")
                    kept = f"{mem['kept_bytes'] / mib:.3f}" if mem else "-"
                    row_bytes = mem["packed_row_bytes"] if mem else "-"
                    exact = ("yes" if mem["kept_bytes"] == mem["formula_bytes"] else "no") if mem else "-"
                    lines.append(f"| {int(length):,} | {b} | {bits} | {ratio:.3f} | {low:.3f}-{high:.3f} "
                                 f"| {m['memory'][str(b)]['kept_bytes'] / mib:.3f} | {kept} | {row_bytes} | {exact} |")
    lines += ["", "| target | limit | worst measured | met |", "|---|---|---|---|"]
    for name, t in results["targets"].items():
        if "worst" in t:
            lines.append(f"| {name} | {t['limit']} | {t['worst']:.3f} | {'yes' if t['met'] else 'no'} |")
        else:
            lines.append(f"| {name} | equal | - | {'yes' if t['met'] else 'no'} |")
    return "\n".join(lines)


def plot(results: dict, budgets: list[int], path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = [int(k) for k in results["lengths"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(lengths, [m["plain_decode_tps"] for m in results["lengths"].values()], "k-o", label="mlx-lm, full context")
    ax.plot(lengths, [m["full_decode_tps"] for m in results["lengths"].values()], "k--x", label="ours, full cache")
    for b, colour in zip(budgets, plt.cm.tab10.colors):
        ax.plot(lengths, [m[f"ours_decode_tps@{b}"] for m in results["lengths"].values()], "-o", color=colour,
                label=f"ours, budget {b}")
        ax.plot(lengths, [m[f"ideal_decode_tps@{b}"] for m in results["lengths"].values()], ":", color=colour,
                label=f"mlx-lm at {b} tokens (ideal)")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("decode tok/s")
    ax.set_title(f"{results['model']}: decode speed")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
