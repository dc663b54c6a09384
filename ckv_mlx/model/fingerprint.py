"""A model's identity for stored caches: a hash of its config, its weights and the
precision it runs in, so a store is never used with another model.

Hashing gigabytes of weights on every start would cost seconds, so each weight file's
checksum is remembered (``weights-checksums.json`` beside the converted models) by its
path, size and modification time, and computed again only when one of them changes.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from pathlib import Path

CHECKSUMS = "weights-checksums.json"
WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".npz")


def model_identity(folder: Path, precision: str, part: str = "") -> str:
    """The identity of the model in ``folder`` run at ``precision``; ``part``: which part of
    it this process holds in a group (its rank, the group's size and how it is split), so
    each rank's stores are its own."""
    folder = Path(folder)
    parts = [precision, _crc(folder / "config.json")] + [part] * bool(part)
    parts += [f"{p.name}:{weight_checksum(p)}" for p in sorted(folder.iterdir()) if p.suffix in WEIGHT_SUFFIXES]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def weight_checksum(path: Path) -> str:
    """The file's CRC-32 and size, from the remembered checksums while it is unchanged."""
    from .gguf import cache_dir

    real, info = str(Path(path).resolve()), Path(path).stat()
    stamp = [info.st_size, info.st_mtime_ns]
    book = cache_dir() / CHECKSUMS
    try:
        known = json.loads(book.read_text())
    except (OSError, ValueError):
        known = {}
    if known.get(real, {}).get("stamp") == stamp:
        return known[real]["checksum"]
    checksum = f"{_crc(Path(real))}-{info.st_size}"
    known[real] = {"stamp": stamp, "checksum": checksum}
    try:
        book.parent.mkdir(parents=True, exist_ok=True)
        tmp = book.with_name(f".{CHECKSUMS}.{os.getpid()}")
        tmp.write_text(json.dumps(known))
        os.replace(tmp, book)
    except OSError:
        pass  # remembering is an optimisation: computed again next time
    return checksum


def _crc(path: Path) -> str:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            crc = zlib.crc32(block, crc)
    return f"{crc:08x}"
