"""Which tokens of a needle each method keeps, layer by layer.

Explains a NIAH miss: reads one needle prompt once on the built-in model, then for each
method feeds the question, asks the method which rows every layer (and KV head) would
keep at the budget, and counts how many (layer, KV head) caches keep each token of the
needle's answer (or of its whole sentence); then compresses and answers as the
evaluation does. Also lists the query heads that put most of their window attention on
the needle, and whether the profile counts them as SRHs. Writes
docs/needle_coverage/<sample>-<budget>-<span>.json and .md.

    .venv/bin/python scripts/needle_coverage.py --length 7000 --depth 11 --needle 2 --budget 64

With ``--fact KIND/FORM/INDEX`` it follows an exact-fact sample of the evaluation instead
(``python -m ckv_mlx.eval --tasks facts``): which digits of the value each layer keeps.

    .venv/bin/python scripts/needle_coverage.py --fact financial/number7/0 --length 2000 --budget 64 \
        --methods compresskv-gqa,compresskv-gqa+span8
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ckv_mlx.model.blas import ensure_fast_blas
from ckv_mlx.errors import CKVError

METHODS = "compresskv,compresskv-gqa,snapkv,pyramidkv"
PG = "../shared/reference/compresskv/haystack/paul_graham_essays"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--haystack", default=PG, help=f"folder or file of text (default {PG})")
    p.add_argument("--length", type=int, default=7000)
    p.add_argument("--depth", type=int, default=11, help="needle depth, %% of the document")
    p.add_argument("--needle", type=int, default=2, help="index into the shipped needles")
    p.add_argument("--fact", help="an exact-fact sample instead, KIND/FORM/INDEX (e.g. financial/number7/0)")
    p.add_argument("--split", default="dev", help="the exact-fact sample's split (default dev)")
    p.add_argument("--budget", type=int, default=64, help="tokens per layer on average")
    p.add_argument("--methods", default=METHODS)
    p.add_argument("--profile", help="profile file (default: the built-in model's)")
    p.add_argument("--span", choices=["answer", "sentence"], default="answer",
                   help="tokens to follow: the needle's answer (default) or the whole sentence")
    p.add_argument("--least", type=float, default=0.1,
                   help="list query heads with at least this share of their window attention on the span")
    p.add_argument("--out", type=Path, default=Path("docs/needle_coverage"))
    return p.parse_args(argv)


def span(tokens: list[int], tokenizer, text: str) -> list[int]:
    """Positions of ``text``'s tokens inside ``tokens`` (with or without a leading space)."""
    for variant in (" " + text, text):
        ids = tokenizer.encode(variant, add_special_tokens=False)
        for start in range(len(tokens) - len(ids) + 1):
            if tokens[start : start + len(ids)] == ids:
                return list(range(start, start + len(ids)))
    raise CKVError(f"{text!r} is not in the prompt's tokens; pick another needle")


def coverage(session, budgets: list[int], positions: list[int]) -> list[list[int]]:
    """For each layer, how many of its KV-head token sets keep each of ``positions``."""
    import numpy as np

    rows = []
    for layer, budget in enumerate(budgets):
        attention, cache = session.attentions[layer], session.caches[layer]
        keys = cache.keys_and_values()[0][0]
        keep = np.array(session.method.keep_indices(layer, attention.window_queries, keys, attention.scale, budget, attention.sinks))
        kept = (keep[:, :, None] == np.array(positions)).any(axis=1)  # [token sets, positions]
        rows.append((kept.sum(axis=0) * (keys.shape[0] // keep.shape[0])).tolist())
    return rows


def readers(session, profile, positions: list[int], least: float) -> list[dict]:
    """Query heads that put at least ``least`` of their pooled window attention (the score
    every window method ranks by) on ``positions``, with their rank among the layer's SRHs."""
    import numpy as np

    from ckv_mlx.policy.scoring import head_scores

    d = profile.defaults
    found = []
    for layer, (attention, cache) in enumerate(zip(session.attentions, session.caches)):
        keys = cache.keys_and_values()[0][0]
        heads = list(range(attention.window_queries.shape[0]))
        scores = np.array(head_scores(attention.window_queries, keys, heads, attention.scale, d.kernel, d.pooling))
        shares = scores[:, positions].sum(axis=1) / scores.sum(axis=1)
        found += [{"layer": layer, "head": h, "share": round(float(shares[h]), 3),
                   "srh_rank": profile.srh[layer].index(h) + 1, "srh": h in profile.srh_heads(layer)}
                  for h in heads if shares[h] >= least]
    return found


def niah_prompt(tok, args):
    """The NIAH prompt asked for and its sample name."""
    from ckv_mlx.eval.niah import load_haystack, load_needles, needle_prompt

    needles = load_needles()
    if not 0 <= args.needle < len(needles):
        raise CKVError(f"--needle {args.needle}: the shipped needles are numbered 0 to {len(needles) - 1}")
    prompt = needle_prompt(tok, load_haystack(args.haystack), [needles[args.needle]], args.length, [args.depth])
    return prompt, f"niah/L{args.length}/D{args.depth}/N{args.needle}"


def fact_prompt(tok, args):
    """The exact-fact prompt of ``--fact`` (the evaluation's) and its sample name."""
    from ckv_mlx.eval import facts

    try:
        kind, form, index = args.fact.split("/")
        index = int(index)
    except ValueError:
        raise CKVError(f"--fact {args.fact!r}: write KIND/FORM/INDEX, e.g. financial/number7/0") from None
    fact, haystack = facts.make_fact(kind, form, args.split, index, Path(args.haystack))
    prompt, _ = facts.fact_prompt(tok, fact, haystack, args.length)
    return prompt, f"facts/{args.split}/{kind}/{form}/L{args.length}/S{index}/D{fact.depth}"


def main(argv=None) -> int:
    ensure_fast_blas()
    args = parse_args(argv)
    try:
        return run(args)
    except CKVError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def run(args) -> int:
    from ckv_mlx.policy.methods import make_method
    from ckv_mlx.model.models import load_model
    from ckv_mlx.eval.niah import exact_match
    from ckv_mlx.profiles import resolve_profile
    from ckv_mlx.engine.session import Session

    loaded = load_model()
    tok = loaded.tokenizer
    profile, _, _ = resolve_profile(args.profile, loaded.shape)
    methods = {name: make_method(name, profile)[0] for name in args.methods.split(",")}
    if not all(m.compresses for m in methods.values()):
        raise CKVError("--methods: list only methods that compress (not full)")
    prompt, sample = fact_prompt(tok, args) if args.fact else niah_prompt(tok, args)
    needle = prompt.needle
    text = needle.real_needle if args.span == "answer" else needle.needle
    positions = span(prompt.document, tok, text)
    session = Session(loaded.model, tok, make_method("full")[0])
    for method in methods.values():
        session.layer_budgets(args.budget, method)  # refuses a budget too small before the long prefill
    session.prefill(prompt.document)
    document = session.snapshot()
    kv_heads = session.caches[0].keys_and_values()[0].shape[1]
    result = {"model": loaded.name, "sample": sample,
              "prompt_tokens": len(prompt.tokens), "budget": args.budget, "kv_heads": kv_heads,
              "span": args.span, "span_positions": positions,
              "span_tokens": [tok.decode([prompt.document[p]]) for p in positions], "methods": {}}
    session.feed(prompt.question)
    result["readers"] = readers(session, profile, positions, args.least)
    result["first_k"] = profile.defaults.first_k
    for name, method in methods.items():
        session.restore(document)
        session.method = method
        logits = session.feed(prompt.question)
        budgets = session.layer_budgets(args.budget)
        kept = coverage(session, budgets, positions)
        session.compress(args.budget)
        answer = tok.decode(list(session.generate(logits, 8)))
        result["methods"][name] = {"layer_budgets": budgets, "kept": kept, "answer": answer,
                                   "found": exact_match(answer, needle)}
    stem = args.out / f"{result['sample'].replace('/', '-')}-{args.budget}-{args.span}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    text = table(result)
    stem.with_suffix(".md").write_text(text + "\n")
    print(text)
    return 0


def table(r: dict) -> str:
    """Per method: caches keeping each token of the span (of layers x KV heads), layers
    keeping the whole span in at least one KV head, and the answer."""
    total = len(next(iter(r["methods"].values()))["kept"]) * r["kv_heads"]
    tokens = " | ".join(f"`{t.strip()}`" for t in r["span_tokens"])
    lines = [f"{r['model']}, {r['sample']} ({r['prompt_tokens']:,} tokens), budget {r['budget']}: caches "
             f"(of {total} = layers x KV heads) that keep each token of the needle's {r['span']}.", "",
             f"| method | {tokens} | layers keeping the whole {r['span']} | answer | found |",
             "|---" * (len(r["span_tokens"]) + 4) + "|"]
    for name, m in r["methods"].items():
        per_token = [sum(layer[i] for layer in m["kept"]) for i in range(len(r["span_tokens"]))]
        whole = sum(all(layer) for layer in m["kept"])
        lines.append(f"| {name} | " + " | ".join(map(str, per_token))
                     + f" | {whole} | {m['answer'].strip()!r} | {'yes' if m['found'] else 'no'} |")
    lines += ["", f"Query heads with the largest share of their window attention on the {r['span']} "
              f"(SRHs: the first {r['first_k']} of each layer's ranking):", "",
              "| layer | query head | share | rank in the layer's SRH ranking | SRH |", "|---|---|---|---|---|"]
    for h in sorted(r["readers"], key=lambda h: -h["share"]):
        lines.append(f"| {h['layer']} | {h['head']} | {h['share']:.3f} | {h['srh_rank']} | {'yes' if h['srh'] else 'no'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
