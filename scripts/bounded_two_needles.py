"""A document whose full cache is 10x the KV limit, asked about two needles in two turns:
``first-question`` in memory against ``per-question`` with the full cache on disk.

    .venv/bin/python scripts/bounded_two_needles.py            # 8,000 tokens, 3 documents
    .venv/bin/python scripts/bounded_two_needles.py --length 1200 --documents 1 --out /tmp/b2

Each document holds two needles (25 % and 75 % deep, shipped haystack); turn 1 asks for
the first, turn 2 for the second. Both read the document in chunks under a KV limit of a
tenth of its full cache, as ``ckv-chat`` does by itself: ``first-question`` scores the
chunks by the first question and keeps what they kept; on disk, every row read also goes
to a store and each question selects from all of them. Reports each answer, whether it
found its needle, and the most KV bytes in memory (the bounded prefill's, and each
turn's). Writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from ckv_mlx.model.blas import ensure_fast_blas


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--length", type=int, default=8000, help="prompt tokens (default 8000)")
    p.add_argument("--documents", type=int, default=3, help="needle pairs (default 3)")
    p.add_argument("--ratio", type=float, default=10, help="full cache / KV limit (default 10)")
    p.add_argument("--budget", type=int, default=128)
    p.add_argument("--out", type=Path, default=Path("docs/bounded_two_needles"))
    return p.parse_args(argv)


def converse(session, sample, policy: str, budget: int, working: int, full=None) -> dict:
    """Both turns of ``sample`` after a bounded prefill (the caller's); what each found."""
    from ckv_mlx.engine.conversation import Conversation, answer_line

    peak = session.stats.peak_kv_bytes
    conversation = Conversation(session, policy, budget, full)
    conversation.open(None if full else session.snapshot())
    turns = []
    for question, scorer in zip(sample.questions, sample.scorers):
        answer = session.tokenizer.decode(answer_line(conversation.ask(question, 8), session.tokenizer, 8))
        turns.append({"answer": answer.strip(), "found": bool(scorer(answer)["score"]),
                      "kv_ram_bytes": conversation.kv_ram_bytes})
    return {"working_budget": working, "prefill_peak_kv_bytes": peak, "turns": turns}


def main(argv=None) -> int:
    ensure_fast_blas()
    args = parse_args(argv)
    from ckv_mlx.disk.disk_cache import read_or_reuse
    from ckv_mlx.eval.tasks import followup_samples
    from ckv_mlx.engine.memory import plan_prefill
    from ckv_mlx.policy.methods import make_method
    from ckv_mlx.model.models import load_model
    from ckv_mlx.eval.niah import DEFAULT_HAYSTACK, load_haystack, load_needles
    from ckv_mlx.profiles import resolve_profile
    from ckv_mlx.engine.session import PREFILL_STEP, Session

    loaded = load_model(None, "float32")
    method = make_method("compresskv", resolve_profile(None, loaded.shape)[0])[0]
    session = Session(loaded.model, loaded.tokenizer, method)
    samples = followup_samples(loaded.tokenizer, load_haystack(DEFAULT_HAYSTACK), load_needles(), args.documents,
                               [args.length], [25])
    results = {"model": loaded.name, "method": method.name, "budget": args.budget, "ratio": args.ratio, "documents": []}
    with tempfile.TemporaryDirectory(prefix="ckv-two-needles-") as root:
        for sample in samples:
            full_bytes = len(sample.document) * loaded.kv_bytes_per_token
            limit = int(full_bytes / args.ratio)
            working, _ = plan_prefill(loaded, len(sample.document), args.budget, str(limit), PREFILL_STEP)
            session.reset()
            session.prefill(sample.document, working_budget=working, question=sample.questions[0])
            memory = converse(session, sample, "first-question", args.budget, working)
            session.reset()
            read = lambda writer: session.prefill(sample.document, working_budget=working, store=writer)  # noqa: E731
            full = read_or_reuse(session, Path(root), sample.key.replace("/", "-"), "document", read, print)
            disk = converse(session, sample, "per-question", args.budget, working, full)
            disk["disk_bytes"] = full.nbytes
            full.close()
            results["documents"].append({"sample": sample.key, "full_kv_bytes": full_bytes, "kv_limit_bytes": limit,
                                         "first-question": memory, "per-question on disk": disk})
            print(f"{sample.key} done", file=sys.stderr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(table(results) + "\n")
    print(table(results))
    return 0


def table(results: dict) -> str:
    mib = 2**20
    lines = [f"{results['model']}, {results['method']} at budget {results['budget']}, KV limit 1/{results['ratio']:g} "
             "of the full cache.",
             "", "| document | policy | full / limit MiB | prefill peak KV MiB | turn 1 answer | found | turn 2 answer "
             "| found | KV in memory per turn MiB |", "|---" * 9 + "|"]
    for doc in results["documents"]:
        for policy in ("first-question", "per-question on disk"):
            r = doc[policy]
            t1, t2 = r["turns"]
            lines.append(
                f"| {doc['sample']} | {policy} | {doc['full_kv_bytes'] / mib:.1f} / {doc['kv_limit_bytes'] / mib:.1f} "
                f"| {r['prefill_peak_kv_bytes'] / mib:.1f} | {t1['answer']!r} | {'yes' if t1['found'] else 'no'} "
                f"| {t2['answer']!r} | {'yes' if t2['found'] else 'no'} "
                f"| {t1['kv_ram_bytes'] / mib:.2f}, {t2['kv_ram_bytes'] / mib:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
