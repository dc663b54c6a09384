"""`python -m ckv_mlx.eval`: NIAH, exact facts, RULER-style QA, fidelity and follow-ups for every method.

Each sample is prefilled once; every (mode, method, budget) then starts from a copy of
that cache. Records go to OUT/records.jsonl (a killed run started again continues), the
tables to OUT/report.md, the plots beside it.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from ..model.blas import ensure_fast_blas, warn_if_slow_blas
from ..errors import CKVError, exit_code

DEFAULT_LENGTHS = [1000, 2000, 4000, 7000]
DEFAULT_DEPTHS = [0, 11, 22, 33, 44, 56, 67, 78, 89, 100]
DEFAULT_BUDGETS = ["32", "64", "128", "256"]
SINGLE_TASKS = ("niah", "facts", "multikey", "multivalue", "variable-tracking", "frequent-words")
TASKS = SINGLE_TASKS + ("followup", "summary", "list")


def _list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in _list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None


def parse_args(argv=None) -> argparse.Namespace:
    from ..policy.methods import METHODS, OPTIONS_HELP
    from ..model.models import MODEL_HELP
    from ..kv.quantized import DEFAULT_GROUP_SIZE
    from .facts import FORMS, KINDS, SPLITS
    from .harness import FOLLOWUP_POLICIES, MODES

    p = argparse.ArgumentParser(prog="python -m ckv_mlx.eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument("--profile", type=Path, help="SRH profile (default: the model's shipped profile in profiles/, or in $CKV_PROFILES_DIR when set)")
    p.add_argument("--tasks", type=_list, default=["niah"], help=f"comma-separated: {', '.join(TASKS)} (default niah)")
    p.add_argument("--lengths", type=_ints, default=DEFAULT_LENGTHS, help="prompt lengths in tokens (default 1000,2000,4000,7000)")
    p.add_argument("--depths", type=_ints, default=DEFAULT_DEPTHS, help="needle depths in %% (default 10 from 0 to 100)")
    p.add_argument("--needles", type=Path, help="needles JSONL (default: the shipped set)")
    p.add_argument("--needle-count", type=int, default=3, help="needles used, from the top of the file (default 3)")
    p.add_argument("--haystack", type=Path, help="haystack .txt or folder, e.g. Paul Graham essays (default: shipped)")
    p.add_argument("--style", choices=("completion", "chat"), default="completion", help="NIAH and facts prompt style")
    p.add_argument("--samples", type=int, default=2, help="RULER-style samples per task and length, facts samples per "
                   "kind, form and length (default 2)")
    p.add_argument("--kinds", type=_list, help=f"facts: haystack kinds, comma-separated: {', '.join(KINDS)} "
                   "(default: all; essays only with --essays)")
    p.add_argument("--forms", type=_list, default=list(FORMS), help=f"facts: needle values: {', '.join(FORMS)} (default all)")
    p.add_argument("--split", choices=SPLITS, default="dev", help="facts: the documents and seeds to use: dev, where "
                   "choices are made, or held-out, evaluated once after them (default dev)")
    p.add_argument("--essays", type=Path, help="facts: a folder of essays (.txt) for the essays kind, e.g. the paper's "
                   "Paul Graham essays")
    p.add_argument("--methods", type=_list, default=list(METHODS), help="comma-separated (default: all); a method "
                   f"may take options after '+', e.g. snapkv+chunk20: {OPTIONS_HELP}")
    p.add_argument("--budgets", type=_list, default=DEFAULT_BUDGETS, help="tokens per layer or %% of the prompt (default 32,64,128,256)")
    p.add_argument("--kv-bits", type=_ints, default=[16], help="bits per value of the kept rows, comma-separated: "
                   "16 keeps them as computed, 8 and 4 quantize them (default 16)")
    p.add_argument("--kv-group-size", type=int, default=DEFAULT_GROUP_SIZE, help="values per scale and bias with "
                   f"--kv-bits 8 or 4 (default {DEFAULT_GROUP_SIZE})")
    p.add_argument("--modes", type=_list, default=list(MODES), help="query-aware, query-agnostic (default both)")
    p.add_argument("--policies", type=_list, default=list(FOLLOWUP_POLICIES),
                   help="multi-turn policies for followup (default all; per-question-disk: per-question with the full cache on disk)")
    p.add_argument("--max-tokens", type=int, default=12, help="answer tokens (default 12; answers stop at a newline)")
    p.add_argument("--working-budget", type=int, help="read each document in chunks that compress as they go, keeping "
                   "this many tokens per layer between chunks (the bounded-memory prefill); default: full prefill")
    p.add_argument("--prefill-chunk", type=int, default=512, help="tokens per chunk with --working-budget (default 512)")
    p.add_argument("--chunk-scoring", choices=["question", "window"], default="question",
                   help="with --working-budget, query-aware: score each chunk by the question read right after it "
                   "(default, as generate and ckv-chat do), or by the chunk's own last tokens (no question known)")
    p.add_argument("--no-fidelity", action="store_true", help="skip the teacher-forced fidelity measurement")
    p.add_argument("--fidelity-only", action="store_true", help="summary and list: score compressed settings by "
                   "fidelity alone, without generating their own answers (several times faster; answer left empty)")
    p.add_argument("--store-dir", type=Path, help="where documents' full caches are stored on disk (default: "
                   "$CKV_STORE_DIR, else stores/ in the user cache): a document read before is not read again")
    p.add_argument("--no-store", action="store_true", help="neither reuse nor store documents' full caches")
    p.add_argument("--out", type=Path, default=Path("runs/eval"), help="output folder (default runs/eval)")
    p.add_argument("--restart", action="store_true", help="discard earlier records in OUT and start over")
    args = p.parse_args(argv)
    if args.kinds is None:
        args.kinds = [k for k in KINDS if k != "essays" or args.essays]
    _check(args, MODES, FOLLOWUP_POLICIES, KINDS, FORMS)
    return args


def _check(args, modes, policies, kinds, forms):
    from ..policy.methods import options
    from .facts import ESSAYS_NEEDED
    from .reading import TASKS as READING_TASKS

    if not args.methods:
        raise CKVError("--methods is empty: name at least one method")
    for method in args.methods:
        options(method)  # an unknown method or option fails here, before any prefill
    for name, given, valid in (("task", args.tasks, TASKS), ("mode", args.modes, modes), ("policy", args.policies, policies),
                               ("kind", args.kinds, kinds), ("form", args.forms, forms)):
        unknown = [x for x in given if x not in valid]
        if unknown or not given:
            raise CKVError(f"unknown {name} {', '.join(unknown) or '(none)'}: choose from {', '.join(valid)}")
    if args.max_tokens < 1 or args.samples < 1 or args.needle_count < 1:
        raise CKVError("--max-tokens, --samples and --needle-count must be at least 1")
    from ..policy.budgets import parse_budget
    from ..kv.quantized import BITS, KVBits

    for budget in args.budgets:
        parse_budget(budget, 1)  # a malformed budget fails here, before any prefill
    if args.working_budget is not None:
        if args.prefill_chunk < 1:
            raise CKVError("--prefill-chunk must be at least 1 token")
        small = [b for b in args.budgets if not b.isdigit() or int(b) > args.working_budget]
        if small or "followup" in args.tasks:
            raise CKVError(f"--working-budget {args.working_budget} must be at least every budget (in tokens) and "
                           "does not apply to followup: raise it or drop those budgets")
    for bits in args.kv_bits:
        if bits != 16 and bits not in BITS:
            raise CKVError(f"--kv-bits {bits}: use 16 (the kept rows as computed), {' or '.join(map(str, BITS))}")
    KVBits(BITS[0], args.kv_group_size)  # a group size mx.quantize refuses fails here, before any prefill
    if "facts" in args.tasks and "essays" in args.kinds and args.essays is None:
        raise CKVError(ESSAYS_NEEDED)
    if args.fidelity_only and (args.no_fidelity or set(args.tasks) - set(READING_TASKS)):
        raise CKVError("--fidelity-only scores summary and list by fidelity alone: drop it, --no-fidelity or the "
                       "other tasks")
    if not all(0 <= d <= 100 for d in args.depths):
        raise CKVError("--depths are percentages: each must be between 0 and 100")


def main(argv=None) -> int:
    ensure_fast_blas()
    return exit_code(lambda: run(parse_args(argv), sys.argv[1:] if argv is None else argv))


def _settings(args, methods) -> list:
    """Every compressing method at every budget and KV bits; the full cache once, as computed."""
    from ..kv.quantized import KVBits
    from .harness import Setting

    bits = [None if b == 16 else KVBits(b, args.kv_group_size) for b in args.kv_bits]
    settings = []
    for method in methods:
        budgets = args.budgets if method.compresses else [None]
        settings += [Setting(method, b, k) for b in budgets for k in (bits if method.compresses else [None])]
    return settings


def _methods(names, profile):
    from ..policy.methods import PROFILED, make_method, options

    if profile is None and any(options(n)[0] in PROFILED for n in names):
        raise CKVError("no SRH profile for this model: make one with `python -m ckv_mlx.profile srh`, "
                       "pass --profile, or leave compresskv out of --methods")
    methods = [make_method(n, profile)[0] for n in names]
    if not any(not m.compresses for m in methods):
        methods.insert(0, make_method("full")[0])
    return methods


def _samples(args, loaded):
    from .niah import DEFAULT_HAYSTACK, DEFAULT_NEEDLES, load_haystack, load_needles
    from .facts import REAL_KINDS
    from .reading import TASKS as READING_TASKS
    from .tasks import fact_samples, followup_samples, niah_samples, reading_samples, ruler_samples

    tokenizer = loaded.tokenizer
    samples = []
    if {"niah", "followup"} & set(args.tasks):
        needles = load_needles(args.needles or DEFAULT_NEEDLES)
        haystack = load_haystack(args.haystack or DEFAULT_HAYSTACK)
        if "niah" in args.tasks:
            samples += niah_samples(tokenizer, haystack, needles[: args.needle_count], args.lengths, args.depths, args.style)
        if "followup" in args.tasks:
            samples += followup_samples(tokenizer, haystack, needles, args.needle_count, args.lengths, args.depths)
    if "facts" in args.tasks:
        samples += fact_samples(tokenizer, args.kinds, args.forms, args.split, args.lengths, args.samples, args.essays,
                                args.style)
    ruler_tasks = [t for t in args.tasks if t in SINGLE_TASKS and t not in ("niah", "facts")]
    samples += ruler_samples(tokenizer, ruler_tasks, args.lengths, args.samples)
    reading_tasks = [t for t in args.tasks if t in READING_TASKS]
    if reading_tasks:
        kinds = [k for k in args.kinds if k in REAL_KINDS] or list(REAL_KINDS)
        samples += reading_samples(tokenizer, reading_tasks, kinds, args.lengths)
    return samples


def _identity(args, loaded, profile) -> dict:
    """What gives a record its meaning. The grid (lengths, depths, methods, budgets,
    modes, tasks) is not part of it: records are keyed by their place in the grid, so a
    run can be extended by running again with more."""
    from .niah import DEFAULT_HAYSTACK, DEFAULT_NEEDLES

    srh = None if profile is None else [profile.srh_heads(l) for l in range(profile.shape.layers)]
    return {"model": loaded.name, "srh": str(srh), "layer_errors": str(profile and profile.layer_errors),
            "needles": str(args.needles or DEFAULT_NEEDLES), "haystack": str(args.haystack or DEFAULT_HAYSTACK),
            "style": args.style, "max_tokens": args.max_tokens,
            **({"essays": str(args.essays)} if "facts" in args.tasks and args.essays else {}),
            **({"prefill": f"chunks of {args.prefill_chunk}, working budget {args.working_budget}"
                + (", chunks scored by the question" if args.chunk_scoring == "question" else "")}
               if args.working_budget else {})}


def run(args, argv) -> int:
    from tqdm import tqdm

    from ..model.models import load_model
    from ..profiles import resolve_profile
    from .runlog import RunLog
    from ..engine.session import Session
    from ..disk.store import store_root
    from . import report
    from .harness import Harness

    loaded = load_model(args.model)
    warn_if_slow_blas()
    longest = max(args.lengths) + args.max_tokens * 3
    if longest > loaded.context_length:
        raise CKVError(f"length {max(args.lengths):,} plus the answers exceeds the model's context of "
                       f"{loaded.context_length:,}: pass shorter --lengths")
    profile, profile_path, notes = resolve_profile(args.profile, loaded.shape)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    methods = _methods(args.methods, profile)
    settings = _settings(args, methods)
    samples = _samples(args, loaded)
    log = RunLog(args.out / "records.jsonl", _identity(args, loaded, profile), args.restart)
    session = Session(loaded.model, loaded.tokenizer, methods[0])
    stores = None if args.no_store else (args.store_dir or store_root())
    harness = Harness(session, loaded.tokenizer, args.max_tokens, fidelity=not args.no_fidelity,
                      answers=not args.fidelity_only,
                      working_budget=args.working_budget, chunk=args.prefill_chunk,
                      chunk_question=args.chunk_scoring == "question", stores=stores, identity=loaded.identity,
                      notify=lambda text: print(f"note: {text}", file=sys.stderr))
    print(f"eval of {loaded.name}: {len(samples)} samples x {len(settings)} settings; records in {log.path}",
          file=sys.stderr)
    interrupted = False
    try:
        with tqdm(samples, unit="sample", dynamic_ncols=True) as bar:
            for sample in bar:
                start, done = time.perf_counter(), log.done
                records = (harness.followups(sample, settings, args.policies, done) if sample.task == "followup"
                           else harness.run(sample, settings, args.modes, done))
                for record in records:
                    log.add({**record, "seconds": round(time.perf_counter() - start, 2)})
                    start = time.perf_counter()
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: records so far are kept; run the same command to continue", file=sys.stderr)
    text = report.write_report(log.records, args.out)
    command = shlex.join(["python", "-m", "ckv_mlx.eval", *argv])
    minutes = sum(r.get("seconds", 0) for r in log.records) / 60
    header = f"# Evaluation of {loaded.name}\n\nCommand: `{command}`\n\n{len(log.records)} records, {minutes:.1f} min.\n\n"
    (args.out / "report.md").write_text(header + text, encoding="utf-8")
    print(f"wrote {args.out / 'report.md'} ({len(log.records)} records, {minutes:.1f} min)", file=sys.stderr)
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
