"""`python -m ckv_mlx.profiles import|show|validate`: make, inspect and check profiles."""

from __future__ import annotations

import argparse
import shlex
import sys

from ..policy.budgets import error_aware
from ..errors import exit_code
from . import Profile, load_profile, save_profile
from .importer import PRESETS, import_head_idx, import_raw_scores

_SHOW_BUDGET = 128


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    return exit_code(lambda: args.run(args, argv))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ckv_mlx.profiles",
        description="Make, inspect and check CompressKV profiles.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    imp = commands.add_parser("import", help="make a profile from files computed elsewhere")
    heads = imp.add_mutually_exclusive_group(required=True)
    heads.add_argument("--head-idx", help="ranked heads per layer: {model}_head_idx.json")
    heads.add_argument("--raw-scores", help='raw per-trial scores: {"layer-head": [...]}')
    imp.add_argument("--layer-score", help="layer errors: {model}_layer_score.jsonl (avg_score)")
    imp.add_argument("--out", required=True, help="profile file to write")
    imp.add_argument("--preset", help=f"model preset: {', '.join(PRESETS)} "
                                      "(default: guessed from the file name)")
    imp.add_argument("--name", help="model name (e.g. the Hugging Face repo name)")
    imp.add_argument("--architecture", help="mlx-lm model type, e.g. llama, mistral, qwen2")
    imp.add_argument("--kv-heads", type=int, help="number of KV heads")
    imp.add_argument("--head-dim", type=int, help="head dimension")
    imp.add_argument("--first-k", type=int, default=4, help="SRHs per layer (default 4)")
    imp.add_argument("--source", help="where the files came from (default: their paths)")
    imp.add_argument("--data", default="", help="what data the scores were computed on")
    imp.add_argument("--notes", default="", help="free text kept in the profile")
    imp.set_defaults(run=_import)

    show = commands.add_parser("show", help="print a summary of a profile")
    show.add_argument("profile")
    show.set_defaults(run=_show)

    validate = commands.add_parser("validate", help="check a profile (exit 0 ok, 2 bad)")
    validate.add_argument("profile")
    validate.set_defaults(run=_validate)
    return parser


def _import(args: argparse.Namespace, argv: list[str]) -> None:
    options = dict(
        preset=args.preset, name=args.name, architecture=args.architecture,
        kv_heads=args.kv_heads, head_dim=args.head_dim, first_k=args.first_k,
        source=args.source, data=args.data, notes=args.notes,
        command=shlex.join(["python", "-m", "ckv_mlx.profiles", *argv]),
    )
    if args.head_idx:
        profile = import_head_idx(args.head_idx, args.layer_score, **options)
    else:
        profile = import_raw_scores(args.raw_scores, args.layer_score, **options)
    save_profile(profile, args.out)
    print(f"wrote {args.out}: {profile.name}, {profile.shape.dims()}")


def _validate(args: argparse.Namespace, argv: list[str]) -> None:
    profile = load_profile(args.profile)
    print(f"ok: {args.profile} ({profile.name}, {profile.shape.dims()})")


def _show(args: argparse.Namespace, argv: list[str]) -> None:
    print("\n".join(summary(load_profile(args.profile))))


def summary(profile: Profile) -> list[str]:
    """Human-readable lines: model, defaults, provenance, SRHs and budgets per layer."""
    shape, d, p = profile.shape, profile.defaults, profile.provenance
    group = shape.query_heads // shape.kv_heads
    lines = [
        f"model:      {shape.name} ({shape.architecture}), {shape.dims()}",
        f"defaults:   window {d.window}, kernel {d.kernel}, {d.pooling} pooling, "
        f"first_k {d.first_k}",
        f"provenance: {p.how} {p.created}".rstrip(),
    ]
    lines += [f"  {key}: {getattr(p, key)}" for key in ("source", "data", "command", "notes")
              if getattr(p, key)]
    budgets = None
    if profile.layer_errors is None:
        lines.append("layer errors: none (uniform budgets)")
    else:
        budgets = error_aware(profile.layer_errors, _SHOW_BUDGET)
        lines.append(f"layer errors: yes (budgets shown for an average of {_SHOW_BUDGET})")
    lines.append("layer  SRH query heads (KV heads)" + ("   error  budget" if budgets else ""))
    for layer, index in enumerate(shape.compressed_layers):  # the model's layer numbers
        heads = profile.srh_heads(layer)
        kv = sorted({h // group for h in heads})
        row = f"{index:5d}  {' '.join(f'{h:3d}' for h in heads)}  ({' '.join(map(str, kv))})"
        if budgets:
            row = f"{row:<40} {profile.layer_errors[layer]:.4f}  {budgets[layer]:6d}"
        lines.append(row)
    return lines


if __name__ == "__main__":
    sys.exit(main())
