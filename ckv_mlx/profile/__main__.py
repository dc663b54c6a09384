"""`python -m ckv_mlx.profile srh|layers|validate`: make a model's CompressKV profile in MLX.

``srh`` finds each layer's Semantic Retrieval Heads with a needle sweep and writes a
profile; ``layers`` adds the per-layer eviction errors that set error-aware budgets;
``validate`` checks a profile (and, with ``--model``, that it fits the model). Both
sweeps keep one record per trial in a run log beside the profile, so a killed run
started again continues where it stopped.
"""

from __future__ import annotations

import argparse
import hashlib
import platform
import shlex
import sys
import time
from dataclasses import replace
from datetime import date
from pathlib import Path

from ..model.blas import ensure_fast_blas, warn_if_slow_blas
from ..errors import CKVError, exit_code

DEFAULT_DEPTHS = [0, 11, 22, 33, 44, 56, 67, 78, 89, 100]
DEFAULT_LAYER_BUDGET = 32


def main(argv: list[str] | None = None) -> int:
    ensure_fast_blas()
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    try:
        return exit_code(lambda: args.run(args, argv))
    except KeyboardInterrupt:
        print("\ninterrupted: finished trials are kept; run the same command to continue",
              file=sys.stderr)
        return 130


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ckv_mlx.profile", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    from ..model.models import MODEL_HELP

    model_help = MODEL_HELP

    srh = commands.add_parser("srh", help="find the Semantic Retrieval Heads; write a profile")
    srh.add_argument("--model", help=model_help)
    srh.add_argument("--needles", type=Path, help="needles JSONL (default: the shipped set)")
    srh.add_argument("--skip-needles", type=int, default=0,
                     help="leave out the file's first needles, e.g. the 3 the evaluation asks for (default 0)")
    srh.add_argument("--haystack", type=Path, help="haystack .txt or folder of them (default: shipped)")
    srh.add_argument("--lengths", type=_ints, help="prompt lengths in tokens (default: 5 from 1,000 to 90%% of the context)")
    srh.add_argument("--depths", type=_ints, default=DEFAULT_DEPTHS, help="needle depths in %% (default: 10 from 0 to 100)")
    srh.add_argument("--style", choices=("completion", "chat"), default="completion")
    srh.add_argument("--max-tokens", type=int, default=32, help="answer tokens per trial (default 32)")
    srh.add_argument("--first-k", type=int, help="SRHs per layer (default: an eighth of the query heads, at least 2)")
    srh.set_defaults(run=_srh)

    layers = commands.add_parser("layers", help="measure per-layer eviction errors; add them to a profile")
    layers.add_argument("--model", help=model_help)
    layers.add_argument("--profile", type=Path, help="profile with SRHs (default: the model's shipped profile in profiles/, or in $CKV_PROFILES_DIR when set)")
    layers.add_argument("--prompts", type=Path, help='JSONL of {"context", "question"} (default: shipped synthetic QA)')
    layers.add_argument("--words", type=int, default=1500, help="context words of the shipped prompts (default 1500)")
    layers.add_argument("--budget", type=int, default=DEFAULT_LAYER_BUDGET, help="selection budget per layer (default 32)")
    layers.add_argument("--reduce", choices=("sum", "mean"), default="sum",
                        help="over decode steps: sum (the reference) or mean (long answers weigh no more)")
    layers.add_argument("--max-tokens", type=int, default=32, help="answer tokens per prompt (default 32)")
    layers.set_defaults(run=_layers)

    for command in (srh, layers):
        command.add_argument("--out", type=Path, help="profile to write (default: <model>.json in profiles/, or in $CKV_PROFILES_DIR when set; layers: the input profile)")
        command.add_argument("--trials", type=Path, help="run log (default: beside --out, .srh.jsonl / .layers.jsonl)")
        command.add_argument("--restart", action="store_true", help="discard the run log and start over")

    validate = commands.add_parser("validate", help="check a profile (exit 0 ok, 2 bad)")
    validate.add_argument("profile", type=Path)
    validate.add_argument("--model", help="also check that the profile fits this model")
    validate.set_defaults(run=_validate)
    return parser


def default_lengths(context_length: int) -> list[int]:
    """Five prompt lengths from 1,000 tokens (or a quarter of the context) to 90 % of it."""
    top = int(context_length * 0.9) // 100 * 100
    low = min(1000, top // 4)
    return sorted({round((low + (top - low) * i / 4) / 100) * 100 for i in range(5)})


def default_first_k(query_heads: int) -> int:
    return min(query_heads, max(2, round(query_heads / 8)))


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def _command(argv: list[str]) -> str:
    return shlex.join(["python", "-m", "ckv_mlx.profile", *argv])


def _source() -> str:
    from importlib.metadata import version

    return (f"ckv-mlx {version('ckv-mlx')} profiler; mlx {version('mlx')}, mlx-lm {version('mlx-lm')}; "
            f"{platform.system()} {platform.machine()}")


def _shown(path: Path) -> str:
    """A data path as a reader of the profile can find it: package data relative to the package."""
    from ..eval.niah import DATA

    path, data = Path(path).resolve(), DATA.resolve()
    return f"ckv_mlx/data/{path.relative_to(data)}" if path.is_relative_to(data) else str(path)


def _out_paths(args, model_name: str, suffix: str) -> tuple[Path, Path]:
    from ..profiles import profiles_dir, slug

    out = args.out or profiles_dir() / f"{slug(model_name)}.json"
    if not out.parent.is_dir():
        raise CKVError(f"cannot write {out}: no folder {out.parent}; choose a writable --out")
    return out, args.trials or out.with_suffix(suffix)


def _run_trials(log, plan, run_one, unit: str):
    """Run every planned (key, job) not yet in the log, with a progress bar and ETA."""
    from tqdm import tqdm

    todo = [(key, job) for key, job in plan if key not in log.done]
    with tqdm(total=len(plan), initial=len(plan) - len(todo), unit=unit, dynamic_ncols=True) as bar:
        for key, job in todo:
            start = time.perf_counter()
            record = run_one(job)
            log.add({"key": key, **record, "seconds": round(time.perf_counter() - start, 2)})
            bar.update(1)


def _srh(args, argv):
    from ..policy.methods import FullCache
    from ..model.models import load_model
    from ..eval.niah import DEFAULT_HAYSTACK, DEFAULT_NEEDLES, load_haystack, load_needles, needle_prompt
    from ..profiles import Defaults, Profile, Provenance, save_profile
    from ..eval.runlog import RunLog
    from ..engine.session import Session
    from .srh import mean_scores, rank_heads, srh_trial

    needles_path, haystack_path = args.needles or DEFAULT_NEEDLES, args.haystack or DEFAULT_HAYSTACK
    needles, haystack = load_needles(needles_path), load_haystack(haystack_path)
    if args.max_tokens < 1:
        raise CKVError("--max-tokens must be at least 1")
    if not 0 <= args.skip_needles < len(needles):
        raise CKVError(f"--skip-needles {args.skip_needles}: {_shown(needles_path)} has {len(needles)} needles; "
                       "leave out fewer")
    needles = needles[args.skip_needles :]
    loaded = load_model(args.model)
    warn_if_slow_blas()
    shape = loaded.shape
    first_k = args.first_k or default_first_k(shape.query_heads)
    if not 1 <= first_k <= shape.query_heads:
        raise CKVError(f"--first-k must be between 1 and {shape.query_heads} (the model's query heads)")
    lengths = args.lengths or default_lengths(loaded.context_length)
    if max(lengths) + args.max_tokens > loaded.context_length:
        raise CKVError(f"length {max(lengths):,} + {args.max_tokens} answer tokens exceeds the model's "
                       f"context of {loaded.context_length:,}: pass shorter --lengths")
    if not all(0 <= d <= 100 for d in args.depths):
        raise CKVError("--depths are percentages: each must be between 0 and 100")
    out, trials = _out_paths(args, loaded.name, ".srh.jsonl")
    settings = {"model": loaded.name, "needles": _digest(str(needles)), "haystack": _digest(haystack),
                "lengths": lengths, "depths": args.depths, "style": args.style, "max_tokens": args.max_tokens}
    log = RunLog(trials, settings, args.restart)
    session = Session(loaded.model, loaded.tokenizer, FullCache())
    plan = [(f"L{length}/D{depth}/N{i}", (length, depth, i))
            for length in lengths for depth in args.depths for i in range(len(needles))]

    def trial(job):
        length, depth, i = job
        prompt = needle_prompt(loaded.tokenizer, haystack, [needles[i]], length, [depth], args.style)
        record = srh_trial(session, loaded.tokenizer, prompt, args.max_tokens)
        return {"length": length, "depth": depth, "needle": args.skip_needles + i, **record}  # its line in the file

    print(f"SRH sweep of {loaded.name}: {len(needles)} needles x {len(lengths)} lengths {lengths} "
          f"x {len(args.depths)} depths; run log {trials}", file=sys.stderr)
    _run_trials(log, plan, trial, "trial")
    scores, counted = mean_scores(log.records, "srh", (shape.layers, shape.query_heads))
    if counted == 0:
        raise CKVError(f"no trial was answered (ROUGE-1 recall > 0.5) in {trials}: the model cannot find "
                       "these needles; try shorter --lengths or --style chat")
    ranking, ranked_scores = rank_heads(scores)
    minutes = sum(r["seconds"] for r in log.records) / 60
    provenance = Provenance(
        how="profiled", source=_source(), command=_command(argv), created=date.today().isoformat(),
        data=(f"SRH needle sweep: {len(needles)} needles from {_shown(needles_path)}"
              + (f" (after its first {args.skip_needles})" if args.skip_needles else "")
              + f" and haystack {_shown(haystack_path)}, "
              f"lengths {lengths} tokens, depths {args.depths} %, {args.style} prompts, greedy, at most "
              f"{args.max_tokens} answer tokens; {counted} of {len(log.records)} trials counted "
              "(ROUGE-1 recall > 0.5)"),
        notes=f"srh: {minutes:.1f} min of trials; per-trial records in {trials.name}",
    )
    profile = Profile(shape=shape, srh=ranking, srh_scores=ranked_scores, provenance=provenance,
                      defaults=replace(Defaults(), first_k=first_k))
    save_profile(profile, out)
    print(f"wrote {out}: {counted}/{len(log.records)} trials counted, {minutes:.1f} min", file=sys.stderr)


def _layers(args, argv):
    from ..policy.methods import CompressKV, FullCache
    from ..model.models import load_model
    from ..profiles import Provenance, resolve_profile, save_profile
    from ..eval.runlog import RunLog
    from ..engine.session import Session
    from .layers import default_prompts, layer_errors, layer_trial, load_prompts

    if args.max_tokens < 1 or args.budget < 1:
        raise CKVError("--max-tokens and --budget must be at least 1")
    prompts = load_prompts(args.prompts) if args.prompts else default_prompts(args.words)
    loaded = load_model(args.model)
    warn_if_slow_blas()
    profile, profile_path, notes = resolve_profile(args.profile, loaded.shape)
    if profile is None:
        raise CKVError(f"no profile with SRHs for {loaded.name}: run `python -m ckv_mlx.profile srh` "
                       "first, or pass --profile")
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    d = profile.defaults
    if args.budget <= d.window:
        raise CKVError(f"--budget {args.budget} must be more than the observation window ({d.window})")
    method = CompressKV(profile, window=d.window, kernel=d.kernel, pooling=d.pooling)
    encoded = [loaded.tokenizer.encode(p.text()) for p in prompts]
    longest = max(map(len, encoded))
    if longest + args.max_tokens > loaded.context_length:
        raise CKVError(f"a prompt of {longest:,} tokens + {args.max_tokens} exceeds the model's context "
                       f"of {loaded.context_length:,}: use shorter prompts or --words")
    args.out = args.out or profile_path
    out, trials = _out_paths(args, loaded.name, ".layers.jsonl")
    settings = {"model": loaded.name, "srh": _digest(str([profile.srh_heads(l) for l in range(profile.shape.layers)])),
                "prompts": _digest(str(prompts)), "budget": args.budget, "reduce": args.reduce,
                "max_tokens": args.max_tokens}
    log = RunLog(trials, settings, args.restart)
    session = Session(loaded.model, loaded.tokenizer, FullCache())

    def trial(job):
        prompt, tokens = job
        record = layer_trial(session, loaded.tokenizer, tokens, method, args.budget, args.max_tokens, args.reduce)
        return {"dataset": prompt.dataset, "prompt_tokens": len(tokens), **record}

    print(f"layer errors of {loaded.name}: {len(prompts)} prompts (longest {longest:,} tokens), "
          f"budget {args.budget}; run log {trials}", file=sys.stderr)
    _run_trials(log, [(p.key, (p, t)) for p, t in zip(prompts, encoded)], trial, "prompt")
    profile.layer_errors = layer_errors(log.records)
    minutes = sum(r["seconds"] for r in log.records) / 60
    datasets = sorted({r["dataset"] for r in log.records})
    p = profile.provenance
    profile.provenance = Provenance(
        how="profiled" if p.how == "profiled" else p.how,
        source=p.source or _source(), created=date.today().isoformat(),
        command=" && ".join(c for c in (p.command, _command(argv)) if c),
        data=" ".join(c for c in (p.data, f"Layer errors: {len(prompts)} prompts ({', '.join(datasets)}; "
                                  f"longest {longest:,} tokens), SRH selection at budget {args.budget}, "
                                  f"{args.reduce} over decode steps, greedy, at most {args.max_tokens} tokens.") if c),
        notes="; ".join(c for c in (p.notes, f"layers: {minutes:.1f} min of prompts; records in {trials.name}") if c),
    )
    save_profile(profile, out)
    print(f"wrote {out}: layer errors from {len(log.records)} prompts, {minutes:.1f} min", file=sys.stderr)


def _validate(args, argv):
    from ..profiles import check_profile_matches, load_profile
    from ..profiles.__main__ import summary

    profile = load_profile(args.profile)
    if args.model:
        from ..model.models import load_model

        for warning in check_profile_matches(profile, load_model(args.model).shape):
            print(f"warning: {warning}", file=sys.stderr)
    print("\n".join(summary(profile)))
    print(f"ok: {args.profile} ({profile.name}, {profile.shape.dims()})")


if __name__ == "__main__":
    sys.exit(main())
