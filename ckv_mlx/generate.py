"""`python -m ckv_mlx.generate`: answer a question over a document with a compressed cache."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from . import DEFAULT_METHOD
from .model.blas import ensure_fast_blas, warn_if_slow_blas
from .errors import CKVError, exit_code

DEFAULT_PROMPT = "Summarize the document in a few sentences."


def parse_args(argv=None) -> argparse.Namespace:
    """The CLI's arguments (imports MLX: call after :func:`ensure_fast_blas`)."""
    from .policy.methods import METHOD_HELP
    from .model.models import MODEL_HELP
    from .model.models import PRECISIONS
    from .text.prompts import TRUNCATE_CHOICES
    from .kv.quantized import BITS, GROUP_SIZE_HELP, GROUP_SIZES, KV_BITS_CHOICES, KV_BITS_HELP, STORE_BITS_HELP
    from .engine.session import PREFILL_STEP

    p = argparse.ArgumentParser(
        prog="python -m ckv_mlx.generate",
        description="Answer a question over a long document with a compressed KV cache.",
    )
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--precision", choices=PRECISIONS, help="float32: dequantize weights to float32 (the fast default on a "
                   "CPU); native: keep weights quantized and run in the model's half-precision dtype, as on a Mac "
                   "(default: $CKV_PRECISION, else native on Metal and float32 on a CPU)")
    p.add_argument("--doc", type=Path, help="document: .pdf .txt .md")
    p.add_argument("--prompt", default=None, help=f"question (default: {DEFAULT_PROMPT!r})")
    p.add_argument("--method", default=DEFAULT_METHOD, help=METHOD_HELP)
    p.add_argument("--budget", default="128", help="tokens per layer (average), or a fraction of the prompt: 5%% or 0.05 (ignored by full)")
    p.add_argument("--profile", type=Path, help="SRH profile (default: the model's shipped profile, if any)")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temp", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, help="mlx-lm's repetition penalty over the last 20 tokens of the "
                   "answer, e.g. 1.1 (default: off)")
    p.add_argument("--raw", action="store_true", help="no chat template: document, newline, prompt")
    p.add_argument("--truncate", choices=TRUNCATE_CHOICES, default="none", help="what to drop when the document exceeds the context (default: refuse)")
    p.add_argument("--region", type=int, default=None, help="rows per layer for generated tokens before re-scoring "
                   "(default: a quarter of each layer's budget, at least 8)")
    p.add_argument("--kv-bits", type=int, choices=KV_BITS_CHOICES, help=KV_BITS_HELP)
    p.add_argument("--kv-group-size", type=int, choices=GROUP_SIZES, help=GROUP_SIZE_HELP)
    p.add_argument("--kv-limit", help="KV cache memory limit, e.g. 512MiB (default: 75%% of a Mac GPU's recommended "
                   "working set, or of MLX's memory limit on a CPU, less the weights); a prompt whose full cache "
                   "exceeds it is read in chunks that compress as they go")
    p.add_argument("--prefill-chunk", type=int, default=PREFILL_STEP, help=f"tokens per prefill chunk (default {PREFILL_STEP})")
    p.add_argument("--store-dir", help="where documents' full caches are stored on disk (default: $CKV_STORE_DIR, "
                   "else stores/ in $XDG_CACHE_HOME/ckv-mlx): a document read before is not read again")
    p.add_argument("--store-bits", type=int, choices=BITS, help=STORE_BITS_HELP)
    p.add_argument("--no-store", action="store_true", help="neither reuse nor store the document's full cache on disk")
    p.add_argument("--json", action="store_true", help="end stdout with one JSON line of results")
    p.add_argument("--pipeline", action="store_true", help="under mlx.launch: split the model by layers (pipeline "
                   "parallel) instead of by heads (tensor parallel, the default)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    ensure_fast_blas()
    args = parse_args(argv)
    from .group.ranks import Ranks, as_rank

    ranks = Ranks()
    try:
        return exit_code(lambda: as_rank(ranks, lambda: run(args, ranks)))
    except KeyboardInterrupt:  # during generation run() keeps the partial answer itself
        print("interrupted: stopped before the answer began", file=sys.stderr)
        return 130


def run(args: argparse.Namespace, ranks) -> int:
    import mlx.core as mx
    from .policy.budgets import parse_budget
    from .text.documents import read_document
    from .engine.memory import plan_prefill
    from .policy.methods import compresses, make_method
    from .model.models import load_model
    from .profiles import resolve_profile
    from .text.prompts import document_prefix, prompt_tokens, question_tail
    from .kv.quantized import AS_COMPUTED_NOTE, kv_bits_setting
    from .engine.session import Session

    if args.max_tokens < 1:
        raise CKVError("--max-tokens must be at least 1")
    if args.prefill_chunk < 1:
        raise CKVError("--prefill-chunk must be at least 1 token")
    if args.region is not None and args.region < 1:
        raise CKVError("--region must be at least 1 (rows per layer for generated tokens)")
    if args.repetition_penalty is not None and args.repetition_penalty <= 0:
        raise CKVError("--repetition-penalty must be more than 0 (1 is no penalty; try 1.1)")
    document = ranks.share(read_document(args.doc) if args.doc and ranks.leader else "")  # rank 0's file
    stores = bool(args.doc) and compresses(args.method) and not args.no_store  # a full cache in memory needs no store
    loaded = load_model(args.model, args.precision, identify=stores, pipeline=args.pipeline)
    warn_if_slow_blas()
    profile, profile_path, notes = resolve_profile(args.profile, loaded.shape)
    method, method_notes = make_method(args.method, profile)
    tokens, dropped = prompt_tokens(
        loaded.tokenizer,
        document,
        args.prompt or DEFAULT_PROMPT,
        raw=args.raw,
        context_length=loaded.context_length,
        reserve=args.max_tokens,
        truncate=args.truncate,
    )
    if dropped:
        notes.append(f"dropped {dropped:,} document tokens ({args.truncate}) to fit the context")
    kv_bits = kv_bits_setting(args.kv_bits, args.kv_group_size, method.compresses, args.store_bits)
    session = Session(loaded.model, loaded.tokenizer, method, region=args.region, kv_bits=kv_bits)
    if kv_bits and not session.kv_bits:
        notes.append(AS_COMPUTED_NOTE)
    budget = parse_budget(args.budget, len(tokens)) if method.compresses else None
    session.layer_budgets(budget)
    working, memory_note = plan_prefill(loaded, len(tokens), budget, args.kv_limit, args.prefill_chunk, ranks)
    for note in notes + method_notes + [memory_note] * bool(memory_note):
        print(f"note: {note}", file=sys.stderr)

    prefix = document_prefix(loaded.tokenizer, document, args.raw) if stores else []
    if prefix and tokens[: len(prefix)] == prefix and len(tokens) > len(prefix):
        logits = _via_store(session, loaded, args, tokens, len(prefix), budget, profile)
    else:
        progress = _progress if sys.stderr.isatty() else None
        question = question_tail(loaded.tokenizer, tokens, args.prompt or DEFAULT_PROMPT, args.raw) if working else None
        logits = session.prefill(tokens, progress, working_budget=working, chunk=args.prefill_chunk, question=question)
        session.compress(budget)
    if args.temp > 0:
        mx.random.seed(ranks.share(int(time.time_ns() % 2**32)))  # every rank samples the same tokens
    text, interrupted = _stream(session, logits, loaded.tokenizer, args)
    report = _group_report(_report(session, loaded, args, budget, profile_path, text, interrupted), ranks)
    out = sys.stderr if args.json else sys.stdout
    print(_summary(report), file=out)
    if args.json:
        print(json.dumps(report))
    return 130 if interrupted else 0


def _via_store(session, loaded, args, tokens: list[int], split: int, budget, profile):
    """Prompt logits with the document's full cache on disk: reused when stored, else
    read and stored; then the question selects from every row (as compressing the
    whole prompt in memory would)."""
    from .engine.reselection import read_or_reuse
    from .kv.quantized import store_bits_setting
    from .engine.memory import plan_prefill
    from .disk.store import document_key, store_root

    document, question = tokens[:split], tokens[split:]
    store_bits = store_bits_setting(args.store_bits, args.kv_group_size)
    working, _ = plan_prefill(loaded, len(document), budget, args.kv_limit, args.prefill_chunk,
                              session.ranks)  # the document's read
    key = document_key(loaded.identity, document, working, args.prefill_chunk, session.method.name, profile, store_bits)
    root = Path(args.store_dir).expanduser() if args.store_dir else store_root()
    progress = _progress if sys.stderr.isatty() else None
    read_now = []

    def read(writer):
        read_now.append(True)
        session.prefill(document, progress, working_budget=working, chunk=args.prefill_chunk, store=writer)

    start = time.perf_counter()
    full = read_or_reuse(session, root, key, "the document", read,
                         lambda text: print(f"note: {text}", file=sys.stderr), kv_bits=store_bits, tokens=document)
    if full is None:  # the disk refused: the document is in memory
        logits = session.feed(question)
        session.compress(budget)
    else:
        session.forget_rows()
        logits = session.reselect(question, full, budget)
        full.close()
        session.stats.disk_bytes, session.stats.store_reused = full.store.nbytes, not read_now
    stats = session.stats
    stats.prefill_s, stats.prompt_tokens = time.perf_counter() - start, len(tokens)
    return logits


def _progress(done: int, total: int):
    end = "" if done < total else "\n"
    print(f"\rprefill {done:,}/{total:,} tokens", end=end, file=sys.stderr, flush=True)


def _stream(session, logits, tokenizer, args) -> tuple[str, bool]:
    """Print the answer as it is generated; Ctrl-C stops it and keeps what was said."""
    detokenizer = tokenizer.detokenizer
    detokenizer.reset()
    interrupted = False
    try:
        for token in session.generate(logits, args.max_tokens, args.temp, repetition_penalty=args.repetition_penalty):
            detokenizer.add_token(token)
            print(detokenizer.last_segment, end="", flush=True)
    except KeyboardInterrupt:
        interrupted = True
    detokenizer.finalize()
    print(detokenizer.last_segment, flush=True)
    if interrupted:
        print(f"interrupted: generation stopped after {session.stats.generated_tokens} tokens", file=sys.stderr)
    return detokenizer.text, interrupted


def _report(session, loaded, args, budget, profile_path, text, interrupted) -> dict:
    s = session.stats
    return {
        "text": text,
        "model": loaded.name,
        "precision": loaded.precision,
        "method": session.method.name,
        "requested_method": args.method,
        "budget": budget,
        "kv_bits": session.kv_bits.bits if session.kv_bits else None,
        "kv_group_size": session.kv_bits.group(loaded.shape.head_dim) if session.kv_bits else None,
        "layer_budgets": s.layer_budgets,
        "prompt_tokens": s.prompt_tokens,
        "generated_tokens": s.generated_tokens,
        "kv_bytes_full": s.kv_bytes_full,
        "kv_bytes_kept": s.kv_bytes_kept,
        "kv_rows_kept": s.kv_rows_kept,
        "kv_ratio": s.kv_bytes_kept / s.kv_bytes_full if s.kv_bytes_full else None,
        "peak_kv_bytes": s.peak_kv_bytes,
        "working_budget": s.working_budget,
        "prefill_tps": s.prefill_tps,
        "decode_tps": s.decode_tps,
        "compress_s": s.compress_s,
        "peak_memory_bytes": s.peak_memory_bytes,
        "disk_bytes": s.disk_bytes,
        "store_reused": s.store_reused,
        "profile": str(profile_path) if profile_path is not None else None,
        "interrupted": interrupted,
    }


GROUP_SUMS = ("kv_bytes_full", "kv_bytes_kept", "kv_rows_kept", "peak_kv_bytes", "peak_memory_bytes", "disk_bytes")


def _group_report(report: dict, ranks) -> dict:
    """``report`` with the group's figures: each byte count summed over the ranks (one
    process: unchanged), and under ``mlx.launch`` the group's size, each rank's kept bytes
    and each rank's peak memory."""
    if ranks.size == 1:
        return report
    kept, peak = ranks.each(report["kv_bytes_kept"]), ranks.each(report["peak_memory_bytes"])
    report.update({name: ranks.total(report[name]) for name in GROUP_SUMS})
    full = report["kv_bytes_full"]
    return {**report, "kv_ratio": report["kv_bytes_kept"] / full if full else None, "ranks": ranks.size,
            "kv_bytes_kept_per_rank": kept, "peak_memory_bytes_per_rank": peak}


def _summary(r: dict) -> str:
    mib = 1024 * 1024
    lines = [
        "",
        f"prompt tokens    {r['prompt_tokens']:,}",
        f"method           {r['method']}" + (f" (asked: {r['requested_method']})" if r["method"] != r["requested_method"] else ""),
        f"KV cache         full {r['kv_bytes_full'] / mib:.2f} MiB -> kept {r['kv_bytes_kept'] / mib:.2f} MiB allocated"
        + (f" ({100 * r['kv_ratio']:.1f} %; rows holding tokens {r['kv_rows_kept'] / mib:.2f} MiB)"
           if r["kv_ratio"] is not None else "")
        + (f", kept rows {r['kv_bits']}-bit (groups of {r['kv_group_size']})" if r["kv_bits"] else ""),
    ]
    if r["disk_bytes"]:
        lines.append(f"full cache       {r['disk_bytes'] / mib:.2f} MiB on disk"
                     + (" (stored before: nothing read)" if r["store_reused"] else " (stored for next time)"))
    if r["working_budget"]:
        lines.append(f"prefill cache    at most {r['peak_kv_bytes'] / mib:.2f} MiB (chunked, {r['working_budget']} tokens per layer between chunks)")
    if r["layer_budgets"]:
        lines.append(f"layer budgets    {_budgets(r['layer_budgets'])} (average {r['budget']})")
    if r.get("ranks"):
        lines.append(f"ranks            {r['ranks']}, kept per rank "
                     + " ".join(f"{b / mib:.2f}" for b in r["kv_bytes_kept_per_rank"]) + " MiB")
    lines += [
        f"prefill          {r['prefill_tps']:.1f} tok/s",
        f"decode           {r['generated_tokens']} tokens, {r['decode_tps']:.1f} tok/s",
        f"peak memory      {r['peak_memory_bytes'] / mib:.0f} MiB",
    ]
    return "\n".join(lines)


def _budgets(budgets: list[int]) -> str:
    if len(set(budgets)) == 1:
        return f"{budgets[0]} x {len(budgets)}"
    return " ".join(str(b) for b in budgets)


if __name__ == "__main__":
    sys.exit(main())
