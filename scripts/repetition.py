"""What mlx-lm's repetition penalty changes in ckv-chat's answers about the sample report.

    .venv/bin/python scripts/repetition.py                # penalties off, 1.1, 1.2, 1.3
    .venv/bin/python scripts/repetition.py --penalties 1.2 --max-tokens 64 --out /tmp/rep

Asks the report's six questions the way ckv-chat does (chat template, the app's default
method and budget, the document prefilled once, each question compressed afresh), greedy,
up to ``--max-tokens`` tokens, and three open requests. Per penalty: answers that ran to
the limit, the share of repeated 4-grams in the answers, and the factual answers that
contain their fact. Writes OUT/repetition.json
and OUT/repetition.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ckv_mlx.model.blas import ensure_fast_blas
from report_files import write_report

QUESTIONS = [
    ("Who is the chief executive officer?", "Helena Marsh"),
    ("Who is the chief financial officer?", "Okafor"),
    ("What was the total revenue in 2025?", "412.6"),
    ("Which product line grew fastest?", "Orchard Crisps"),
    ("In which city did the new plant open?", "Yakima"),
    ("How many full-time employees does the company have?", "2,140"),
    ("Summarize the report.", None),  # open requests: where the model loops
    ("What are the main risks the company faces?", None),
    ("What is the outlook for 2026?", None),
]


def repeated_share(tokens: list[int], n: int = 4) -> float:
    """Share of the answer's n-grams that occurred earlier in it (0: no loop)."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def main(argv=None) -> int:
    ensure_fast_blas()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--doc", type=Path, default=Path("samples/report.pdf"))
    p.add_argument("--penalties", default="off,1.1,1.2,1.3")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--out", type=Path, default=Path("docs/repetition"))
    args = p.parse_args(argv)

    from ckv_mlx.policy.budgets import parse_budget
    from ckv_mlx.chat.events import ChatSettings
    from ckv_mlx.text.documents import read_document
    from ckv_mlx.policy.methods import make_method
    from ckv_mlx.model.models import load_model
    from ckv_mlx.profiles import resolve_profile
    from ckv_mlx.text.prompts import split_prompt
    from ckv_mlx.engine.session import Session

    start = time.perf_counter()
    settings = ChatSettings()
    loaded = load_model(settings.model)
    profile, _, _ = resolve_profile(None, loaded.shape)
    method, _ = make_method(settings.method, profile)
    text = read_document(args.doc)
    splits = [split_prompt(loaded.tokenizer, text, q, raw=False) for q, _ in QUESTIONS]
    session = Session(loaded.model, loaded.tokenizer, method)
    session.prefill(splits[0][0])
    document = session.snapshot()
    budget = parse_budget(settings.budget, len(splits[0][0]))
    records = []
    for penalty in args.penalties.split(","):
        value = None if penalty == "off" else float(penalty)
        for (question, fact), (doc_tokens, question_tokens) in zip(QUESTIONS, splits):
            assert doc_tokens == splits[0][0], "the chat template must put the document before the question"
            session.restore(document)
            logits = session.feed(question_tokens)
            session.compress(budget)
            answer = list(session.generate(logits, args.max_tokens, repetition_penalty=value))
            reply = loaded.tokenizer.decode(answer)
            records.append({"penalty": penalty, "question": question, "fact": fact, "answer": reply,
                            "tokens": len(answer), "at_limit": len(answer) == args.max_tokens,
                            "repeated_4grams": repeated_share(answer), "correct": fact is not None and fact in reply})
            print(f"{penalty}: {question} -> {len(answer)} tokens: {reply[:60]!r}", file=sys.stderr)
    result = {"model": loaded.name, "doc": str(args.doc), "method": method.name, "budget": budget,
              "prompt_tokens": len(splits[0][0]), "max_tokens": args.max_tokens,
              "seconds": round(time.perf_counter() - start, 1), "records": records}
    write_report(args.out, "repetition", result, table(result))
    return 0


def table(result: dict) -> str:
    lines = [
        f"{result['model']}, {result['method']} at budget {result['budget']}, {result['doc']} "
        f"({result['prompt_tokens']:,} tokens), chat template, greedy, at most {result['max_tokens']} tokens; "
        f"{result['seconds']:.0f} s.",
        "",
        "| repetition penalty | answers at the token limit | repeated 4-grams (mean) | mean tokens | facts found |",
        "|---|---|---|---|---|",
    ]
    penalties = list(dict.fromkeys(r["penalty"] for r in result["records"]))
    for penalty in penalties:
        rs = [r for r in result["records"] if r["penalty"] == penalty]
        factual = [r for r in rs if r["fact"] is not None]
        lines.append(f"| {penalty} | {sum(r['at_limit'] for r in rs)}/{len(rs)} "
                     f"| {100 * sum(r['repeated_4grams'] for r in rs) / len(rs):.1f} % "
                     f"| {sum(r['tokens'] for r in rs) / len(rs):.0f} | {sum(r['correct'] for r in factual)}/{len(factual)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
