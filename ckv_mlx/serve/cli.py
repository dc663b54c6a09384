"""`ckv-serve`: an OpenAI-compatible server whose caches are compressed.

    ckv-serve                                   # the built-in model on http://127.0.0.1:8080/v1
    ckv-serve --model mlx-community/Qwen3-4B-4bit --budget 256 --port 8000
    CKV_API_KEY=sk-... ckv-serve --host 0.0.0.0      # beyond this machine: with a key
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import sys
from pathlib import Path

from .. import DEFAULT_METHOD
from ..model.blas import ensure_fast_blas
from ..errors import CKVError, exit_code
from .protocol import Limits

KEY_ENV = "CKV_API_KEY"
GRACEFUL_SHUTDOWN_S = 3  # the most a stop waits for connections after their requests were ended


def parse_args(argv=None) -> argparse.Namespace:
    from ..policy.methods import METHOD_HELP
    from ..model.models import MODEL_HELP, PRECISIONS
    from ..kv.quantized import BITS, GROUP_SIZE_HELP, GROUP_SIZES, KV_BITS_CHOICES, KV_BITS_HELP, STORE_BITS_HELP

    p = argparse.ArgumentParser(prog="ckv-serve", description=__doc__.splitlines()[0].split(": ", 1)[1])
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument("--precision", choices=PRECISIONS, help="float32 or native (default: $CKV_PRECISION, else native on "
                   "Metal and float32 on a CPU)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--api-key", default=None, help=f"every route but /health needs 'Authorization: Bearer <key>' "
                   f"(default: ${KEY_ENV}; required to listen beyond loopback)")
    p.add_argument("--allow-unauthenticated", action="store_true", help="listen beyond loopback without a key: "
                   "anyone who can reach the port can use the model")
    p.add_argument("--profile", help="SRH profile (default: the model's shipped profile, if any)")
    p.add_argument("--method", default=DEFAULT_METHOD, help=f"default method, {METHOD_HELP} "
                   '(a request\'s "ckv": {"method": ...} overrides it)')
    p.add_argument("--budget", default="128", help="default tokens per layer, or a share of the prompt: 5%%")
    p.add_argument("--kv-bits", type=int, choices=KV_BITS_CHOICES, help=KV_BITS_HELP)
    p.add_argument("--kv-group-size", type=int, choices=GROUP_SIZES, help=GROUP_SIZE_HELP)
    p.add_argument("--max-tokens", type=int, default=Limits.max_tokens,
                   help=f"the most tokens one answer may ask for (default {Limits.max_tokens})")
    p.add_argument("--max-body", help=f"largest request body (default {Limits.max_body_bytes // 2**20}MiB)")
    p.add_argument("--max-waiting", type=int, default=Limits.max_waiting, help="requests that may wait behind the "
                   f"running one; more are answered 429 with Retry-After (default {Limits.max_waiting})")
    p.add_argument("--kv-limit", help="KV cache memory limit, e.g. 2GiB (default: from the device's memory); a prefix "
                   "whose full cache exceeds it is read in chunks that compress as they go")
    p.add_argument("--store-dir", type=Path, help="where shared prefixes' full caches are stored on disk (default: "
                   "$CKV_STORE_DIR, else stores/ in the user cache)")
    p.add_argument("--store-limit", help="disk for stored prefixes before the least recently used go (default 20GiB)")
    p.add_argument("--store-bits", type=int, choices=BITS, help=STORE_BITS_HELP)
    p.add_argument("--no-store", action="store_true", help="read every prompt whole, storing nothing")
    p.add_argument("--pipeline", action="store_true", help="under mlx.launch: split the model by layers (pipeline "
                   "parallel) instead of by heads (tensor parallel, the default)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    ensure_fast_blas()
    args = parse_args(argv)
    from ..group.ranks import Ranks, as_rank

    ranks = Ranks()
    return exit_code(lambda: as_rank(ranks, lambda: serve(args, ranks)))


def server_key(args: argparse.Namespace) -> str | None:
    """The key requests must carry (--api-key, else $CKV_API_KEY; None: none); listening
    beyond loopback without one is refused in one line unless --allow-unauthenticated."""
    key = args.api_key if args.api_key is not None else os.environ.get(KEY_ENV)
    if not key and not _loopback(args.host) and not args.allow_unauthenticated:
        raise CKVError(f"refusing to listen on {args.host} without an API key: anyone who can reach it could use the "
                       f"model; pass --api-key (or set {KEY_ENV}), or --allow-unauthenticated")
    return key or None


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve beyond this machine
        return False


def serve(args: argparse.Namespace, ranks) -> int:
    import uvicorn

    from ..engine.memory import parse_size
    from ..policy.methods import METHODS, compresses, make_method
    from ..model.models import load_model
    from ..profiles import resolve_profile
    from ..kv.quantized import kv_bits_setting, store_bits_setting
    from ..disk.store import DEFAULT_LIMIT_BYTES, store_root
    from .app import create_app
    from .protocol import Compression
    from .worker import ServeSettings, Worker

    _stop_cleanly_on_sigterm()
    api_key = server_key(args)
    if args.max_tokens < 1:
        raise CKVError("--max-tokens must be at least 1")
    if args.max_waiting < 0:
        raise CKVError("--max-waiting must be 0 or more")
    limits = Limits(args.max_tokens, parse_size(args.max_body) if args.max_body else Limits.max_body_bytes,
                    args.max_waiting)
    kv_bits_setting(args.kv_bits, args.kv_group_size, compresses(args.method), args.store_bits)
    settings = ServeSettings(
        store_dir=None if args.no_store else (args.store_dir or store_root()),
        store_limit=parse_size(args.store_limit) if args.store_limit else DEFAULT_LIMIT_BYTES,
        store_bits=store_bits_setting(args.store_bits, args.kv_group_size), kv_limit=args.kv_limit,
        kv_bits=args.kv_bits, kv_group_size=args.kv_group_size,
    )
    loaded = load_model(args.model, args.precision, identify=not args.no_store,  # no store: nothing to key
                        pipeline=args.pipeline)
    profile, _, notes = resolve_profile(args.profile, loaded.shape)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    make_method(args.method, profile)  # a method that needs a profile it lacks is refused now, in one line
    worker = Worker(loaded, profile, settings, ranks)
    if not ranks.leader:  # under mlx.launch: rank 0 serves HTTP, this rank its requests
        worker.follow()
        return 0
    defaults = Compression(args.method, args.budget)
    app = create_app(worker, loaded.name, defaults, list(METHODS), limits, api_key)
    print(f"serving {loaded.name} on http://{args.host}:{args.port}/v1 ({args.method}, budget {args.budget})",
          file=sys.stderr)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning",
                    timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    finally:
        worker.close()
    return 0


def _stop_cleanly_on_sigterm():
    """SIGTERM stops ckv-serve with status 0: uvicorn first ends the requests in flight
    (streams get an error event), then raises the signal again, which lands here."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))


if __name__ == "__main__":
    sys.exit(main())
