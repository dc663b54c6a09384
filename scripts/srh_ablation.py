"""The paper's SRH ablation: mask heads (uniform attention) while decoding NIAH answers.

Masks the profile's top-N Semantic Retrieval Heads (ranked over all layers), the top-N
classic retrieval heads of the same sweep (Wu et al., from the profiler's run log) and
N random heads (several seeds), and reports NIAH accuracy for each. Writes
docs/srh_ablation.json and a Markdown table (stdout and docs/srh_ablation.md).

    .venv/bin/python scripts/srh_ablation.py --lengths 500,1500 --depths 0,50,100 --heads 10,20
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

from ckv_mlx.model.blas import ensure_fast_blas

ROOT = Path(__file__).resolve().parents[1]


def top_heads(per_head: dict[tuple[int, int], float], n: int) -> list[tuple[int, int]]:
    """The ``n`` (layer, head) pairs with the highest score (ties: lower layer, head)."""
    return sorted(per_head, key=lambda lh: (-per_head[lh], lh))[:n]


def srh_scores(profile) -> dict[tuple[int, int], float]:
    return {(layer, head): score
            for layer, (heads, scores) in enumerate(zip(profile.srh, profile.srh_scores))
            for head, score in zip(heads, scores)}


def retrieval_scores(trials: Path, shape) -> dict[tuple[int, int], float]:
    """Mean classic retrieval score per head over the counted trials of the SRH run log."""
    from ckv_mlx.errors import read_jsonl
    from ckv_mlx.profile.srh import mean_scores

    records = [row for _, row in read_jsonl(trials, "trials") if "settings" not in row]
    mean, _ = mean_scores(records, "retrieval", (shape.layers, shape.query_heads))
    return {(l, h): float(mean[l, h]) for l in range(shape.layers) for h in range(shape.query_heads)}


def by_layer(heads: list[tuple[int, int]], layers: int) -> list[list[int]]:
    out = [[] for _ in range(layers)]
    for layer, head in heads:
        out[layer].append(head)
    return out


def main() -> int:
    ensure_fast_blas()
    from ckv_mlx.engine.conversation import answer_line
    from ckv_mlx.policy.methods import make_method
    from ckv_mlx.model.models import load_model
    from ckv_mlx.eval.niah import exact_match, load_haystack, load_needles, needle_prompt, DEFAULT_HAYSTACK, DEFAULT_NEEDLES
    from ckv_mlx.profiles import resolve_profile
    from ckv_mlx.engine.session import Session
    from ckv_mlx.profile.taps import HeadMask, tapped

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", type=Path)
    p.add_argument("--trials", type=Path, help="the profiler's SRH run log (default: beside the profile)")
    p.add_argument("--lengths", default="500,1500")
    p.add_argument("--depths", default="0,50,100")
    p.add_argument("--heads", default="10,20", help="how many heads to mask")
    p.add_argument("--seeds", type=int, default=3, help="random head sets per size")
    p.add_argument("--haystack", type=Path, default=DEFAULT_HAYSTACK)
    p.add_argument("--needles", type=Path, default=DEFAULT_NEEDLES)
    p.add_argument("--max-tokens", type=int, default=12)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "srh_ablation")
    args = p.parse_args()

    loaded = load_model(None)
    profile, profile_path, _ = resolve_profile(args.profile, loaded.shape)
    trials = args.trials or profile_path.with_suffix(".srh.jsonl")
    srh, retrieval = srh_scores(profile), retrieval_scores(trials, loaded.shape)
    layers, n_heads = loaded.shape.layers, loaded.shape.query_heads
    everything = [(l, h) for l in range(layers) for h in range(n_heads)]
    conditions = {"none": []}
    for n in (int(x) for x in args.heads.split(",")):
        conditions[f"top-{n} SRH"] = top_heads(srh, n)
        conditions[f"top-{n} retrieval"] = top_heads(retrieval, n)
        for seed in range(args.seeds):
            conditions[f"random-{n} seed {seed}"] = random.Random(seed).sample(everything, n)

    tokenizer = loaded.tokenizer
    session = Session(loaded.model, tokenizer, make_method("full")[0])
    needles, haystack = load_needles(args.needles), load_haystack(args.haystack)
    results = {name: [] for name in conditions}
    start = time.perf_counter()
    for length in (int(x) for x in args.lengths.split(",")):
        for depth in (int(x) for x in args.depths.split(",")):
            for needle in needles:
                tokens = needle_prompt(tokenizer, haystack, [needle], length, [depth]).tokens
                session.reset()
                session.feed(tokens[:-1])
                prefilled = session.snapshot()
                for name, heads in conditions.items():
                    session.restore(prefilled)
                    with tapped(session.attentions, [HeadMask(h) for h in by_layer(heads, layers)]):
                        logits = session.feed(tokens[-1:])
                        answer = answer_line(session.generate(logits, args.max_tokens), tokenizer, args.max_tokens)
                    results[name].append(exact_match(tokenizer.decode(answer), needle))
                print(f"L{length} D{depth} {needle.key}: " + " ".join(
                    f"{int(r[-1])}" for r in results.values()), file=sys.stderr, flush=True)
    minutes = (time.perf_counter() - start) / 60
    summary = {name: sum(r) / len(r) for name, r in results.items()}
    table = markdown(conditions, summary, len(results["none"]), args)
    args.out.with_suffix(".json").write_text(json.dumps(
        {"args": {k: str(v) for k, v in vars(args).items()}, "trials": len(results["none"]), "minutes": round(minutes, 1),
         "masked": {k: [list(x) for x in v] for k, v in conditions.items()}, "accuracy": summary,
         "per_trial": results}, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(table)
    print(table)
    print(f"{minutes:.1f} min", file=sys.stderr)
    return 0


def markdown(conditions, summary, trials, args) -> str:
    rows = ["| heads masked while decoding | NIAH accuracy |", "|---|---|"]
    for name in conditions:
        rows.append(f"| {name} | {100 * summary[name]:.1f} % |")
    sizes = sorted({int(n.split()[0].split("-")[1]) for n in conditions if n != "none"})
    for n in sizes:
        seeds = [summary[k] for k in conditions if k.startswith(f"random-{n} ")]
        rows.append(f"| random-{n}, mean of {len(seeds)} seeds | {100 * sum(seeds) / len(seeds):.1f} % |")
    rows.append(f"\n{trials} trials: lengths {args.lengths}, depths {args.depths}, every needle of {args.needles.name}.")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    sys.exit(main())
