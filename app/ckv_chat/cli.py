"""`ckv-chat --doc FILE`: chat with a long document in the terminal."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ckv_mlx import DEFAULT_METHOD
from ckv_mlx.model.blas import ensure_fast_blas


def parse_args(argv=None) -> argparse.Namespace:
    from ckv_mlx.chat.events import DEFAULT_POLICY
    from ckv_mlx.engine.conversation import POLICIES
    from ckv_mlx.policy.methods import METHOD_HELP
    from ckv_mlx.model.models import MODEL_HELP, PRECISIONS
    from ckv_mlx.text.prompts import TRUNCATE_CHOICES
    from ckv_mlx.kv.quantized import BITS, GROUP_SIZE_HELP, GROUP_SIZES, KV_BITS_CHOICES, KV_BITS_HELP, STORE_BITS_HELP

    p = argparse.ArgumentParser(prog="ckv-chat", description="Chat with a long document; the KV cache is compressed with CompressKV.")
    p.add_argument("--doc", type=Path, help="document to open: .pdf .txt .md .html .docx .epub")
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument("--precision", choices=PRECISIONS, help="float32: dequantize weights to float32 (the fast default on "
                   "a CPU); native: keep weights quantized and run in the model's half-precision dtype, as on a Mac "
                   "(default: $CKV_PRECISION, else native on Metal and float32 on a CPU)")
    p.add_argument("--profile", help="SRH profile (default: the model's shipped profile in profiles/, "
                   "or in $CKV_PROFILES_DIR when set, if any)")
    p.add_argument("--method", default=DEFAULT_METHOD, help=METHOD_HELP)
    p.add_argument("--budget", default="128", help="tokens per layer (average), or a share of the document: 5%%")
    p.add_argument("--policy", default=DEFAULT_POLICY, choices=POLICIES,
                   help=f"what follow-up questions use (default {DEFAULT_POLICY}; see the README)")
    p.add_argument("--max-tokens", type=int, default=512, help="longest answer, in tokens")
    p.add_argument("--truncate", choices=TRUNCATE_CHOICES, default="none", help="a document over the model's "
                   "context: refuse it (default; /truncate chooses later) or drop part of it at the start, middle or end")
    p.add_argument("--conversation-room", type=int, help="tokens a document cut to fit leaves for the conversation "
                   "(default: a quarter of the context); a question that does not fit drops the oldest turns first")
    p.add_argument("--repetition-penalty", type=float, help="mlx-lm's repetition penalty over the last 20 tokens of "
                   "the answer, e.g. 1.1 (default: off)")
    p.add_argument("--kv-bits", type=int, choices=KV_BITS_CHOICES, help=KV_BITS_HELP)
    p.add_argument("--kv-group-size", type=int, choices=GROUP_SIZES, help=GROUP_SIZE_HELP)
    p.add_argument("--kv-limit", help="KV cache memory limit, e.g. 512MiB (default: 75%% of a Mac GPU's recommended "
                   "working set, or of MLX's memory limit on a CPU, less the weights); a document whose full cache "
                   "exceeds it is read in chunks that compress as they go")
    p.add_argument("--full-cache", choices=("disk", "memory"), default="disk", help="where per-question keeps the "
                   "document's full cache: on disk, memory holding only what each question selects (default), or in memory")
    p.add_argument("--store-dir", help="where full caches on disk live (default: $CKV_STORE_DIR, else "
                   "stores/ in $XDG_CACHE_HOME/ckv-mlx); a document read before is not read again")
    p.add_argument("--store-bits", type=int, choices=BITS, help=STORE_BITS_HELP)
    p.add_argument("--store-limit", help="disk for stored full caches before the least recently used go (default 20GiB)")
    p.add_argument("--resume", type=Path, help="a session saved with Ctrl+S: restore it without a new prefill")
    p.add_argument("--session", type=Path, help="where Ctrl+S saves the session (default: DOC.ckv here)")
    p.add_argument("--pipeline", action="store_true", help="under mlx.launch: split the model by layers (pipeline "
                   "parallel) instead of by heads (tensor parallel, the default)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    ensure_fast_blas()
    args = parse_args(argv)
    if args.max_tokens < 1:
        print("error: --max-tokens must be at least 1", file=sys.stderr)
        return 2
    if args.repetition_penalty is not None and args.repetition_penalty <= 0:
        print("error: --repetition-penalty must be more than 0 (1 is no penalty; try 1.1)", file=sys.stderr)
        return 2
    from ckv_mlx.errors import CKVError
    from ckv_mlx.engine.memory import parse_size
    from ckv_mlx.policy.methods import compresses
    from ckv_mlx.kv.quantized import kv_bits_setting

    try:
        args.kv_limit and parse_size(args.kv_limit)
        args.store_limit and parse_size(args.store_limit)
        kv_bits_setting(args.kv_bits, args.kv_group_size, compresses(args.method), args.store_bits)
    except CKVError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from ckv_mlx.chat.engine import ChatEngine, log_path, quiet_libraries
    from ckv_mlx.chat.events import ChatSettings
    from ckv_mlx.group.ranks import Ranks

    from .app import ChatApp

    settings = ChatSettings(model=args.model, precision=args.precision, profile=args.profile, method=args.method,
                            budget=args.budget, policy=args.policy, max_tokens=args.max_tokens, kv_limit=args.kv_limit,
                            repetition_penalty=args.repetition_penalty, truncate=args.truncate,
                            conversation_room=args.conversation_room,
                            kv_bits=args.kv_bits, kv_group_size=args.kv_group_size,
                            full_cache=args.full_cache, store_dir=args.store_dir, store_limit=args.store_limit,
                            store_bits=args.store_bits, pipeline=args.pipeline)
    ranks = Ranks()
    if not ranks.leader:  # under mlx.launch: rank 0 runs the app, this rank its jobs
        with quiet_libraries(log_path()):
            ChatEngine(settings, lambda event: None, ranks=ranks).follow()
        return 0
    app = ChatApp(lambda emit: ChatEngine(settings, emit), settings, doc=args.doc, resume=args.resume,
                  session=args.session)
    with quiet_libraries(log_path()):  # nothing but Textual may write to the terminal
        app.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
