"""`ckv-stores`: list and clear the documents' full caches stored on disk.

    ckv-stores                      # list them, most recently used first
    ckv-stores clear                # remove every one
    ckv-stores clear KEY [KEY ...]  # remove these
    ckv-stores prune --limit 5GiB   # remove the least recently used past 5 GiB
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from .errors import CKVError
from .engine.memory import mib, parse_size
from .disk.store import DEFAULT_LIMIT_BYTES, list_stores, prune, store_root


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ckv-stores", description=__doc__.splitlines()[0].split(": ", 1)[1])
    p.add_argument("--dir", type=Path, help="the store folder (default: $CKV_STORE_DIR, else stores/ in the user cache)")
    sub = p.add_subparsers(dest="command")
    sub.add_parser("list", help="list the stores (the default)")
    clear = sub.add_parser("clear", help="remove stores: the keys given, or every one")
    clear.add_argument("keys", nargs="*")
    limit = sub.add_parser("prune", help="remove the least recently used stores past a size")
    limit.add_argument("--limit", default=None, help=f"e.g. 5GiB (default {DEFAULT_LIMIT_BYTES // 2**30} GiB)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    root = args.dir or store_root()
    stores = list_stores(root)
    try:
        if args.command == "clear":
            return _clear(stores, args.keys)
        if args.command == "prune":
            removed = prune(root, parse_size(args.limit) if args.limit else DEFAULT_LIMIT_BYTES)
            print(f"removed {len(removed)} of {len(stores)} stores")
            return 0
    except CKVError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return _list(root, stores)


def _list(root: Path, stores: list[dict]) -> int:
    print(f"{len(stores)} stores in {root}, {mib(sum(s['bytes'] for s in stores))} in all")
    for store in stores:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(store["used"]))
        print(f"{store['key']}  {store['tokens']:>9,} tokens  {mib(store['bytes']):>12}  used {used}")
    return 0


def _clear(stores: list[dict], keys: list[str]) -> int:
    known = {s["key"]: s for s in stores}
    unknown = [k for k in keys if k not in known]
    if unknown:
        print(f"error: no store {unknown[0]}: `ckv-stores` lists them", file=sys.stderr)
        return 2
    chosen = [known[k] for k in keys] if keys else stores
    for store in chosen:
        shutil.rmtree(store["path"], ignore_errors=True)
    print(f"removed {len(chosen)} stores ({mib(sum(s['bytes'] for s in chosen))})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
