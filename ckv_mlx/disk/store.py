"""The document store: a document's full KV cache on disk, one layer readable alone.

A store is a folder ``<root>/<key>/`` holding, for each layer, ``NNN.keys`` and
``NNN.values``: the rows in position order as raw ``[rows, kv_heads, head_dim]`` arrays
in the cache's dtype, plus ``queries.safetensors`` (each layer's window queries at the
end of the document), for a model with layers that do not compress ``others.safetensors``
(mlx-lm's caches of those layers at the end of the document: a sliding window, a
recurrent state) and ``manifest.json``. Raw arrays rather than safetensors because a
store grows chunk by chunk while a document is read, and safetensors puts each tensor's
size in a header before its data; raw rows append as they come, and one layer is read
alone (memory-mapped) without touching the others. A store kept quantized (``kv_bits``,
e.g. 8-bit: about half the bytes each re-selection reads) holds each row as
``mx.quantize`` packs it, per KV head the packed values then the scales then the biases;
its manifest and its key record the bits.

The manifest, with each file's size and CRC-32, is written last into a private
``.tmp-*`` folder, which one rename then publishes: a store being written is never taken
for a complete one, and when two processes read the same new document the second finds
the first's store published and drops its own. :func:`open_store` checks every size and
checksum and removes a store that fails.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..errors import CKVError
from ..safetensors_file import read_caches, write_caches, write_safetensors
from ..kv.quantized import KVBits

STORE_FORMAT = "ckv-store/1"
MANIFEST = "manifest.json"
QUERIES = "queries.safetensors"
OTHERS = "others.safetensors"
DEFAULT_LIMIT_BYTES = 20 * 2**30  # stores kept on disk before the least recently used go
READ_BLOCK_ROWS = 512  # rows read from disk at a time: one prefill chunk, all a layer read allocates beside its rows
STORED_QUERIES = 64  # window queries a store keeps per layer: enough for any method chosen later
STORE_DIR_ENV = "CKV_STORE_DIR"
CONVERSATIONS = ".conversations"  # under a store root: the rows of each running conversation, by process
LEASE = "lease"  # in a conversation's folder: the key of the store it reads, which prune leaves alone

# MLX dtypes as NumPy can hold their bytes (bfloat16 travels as uint16 and is viewed back).
_RAW = {mx.float32: np.float32, mx.float16: np.float16, mx.bfloat16: np.uint16}
_DTYPES = {str(d): d for d in _RAW}


class StoreCorrupt(CKVError):
    """A store on disk does not match its manifest."""


def store_root() -> Path:
    """Where stores live by default: ``$CKV_STORE_DIR``, else ``stores`` beside the
    converted models (in ``$XDG_CACHE_HOME/ckv-mlx``)."""
    from ..model.gguf import cache_dir

    return Path(os.environ.get(STORE_DIR_ENV) or cache_dir() / "stores")


def document_key(model_identity: str, document: list[int], working_budget: int | None = None, chunk: int = 0,
                 method: str = "", profile=None, kv_bits: KVBits | None = None) -> str:
    """The name of a document's store: the one builder every tool uses. A hash of the
    format, the model's identity, the document's tokens (so the template, ``--raw`` and
    any truncation) and how it was read: whole, or in bounded chunks, whose stored rows
    depend on what the chunks kept (the working budget, the chunk, the method and the
    profile's content: two profiles of one file name are two keys, one profile reached
    by two paths is one); and the bits the rows are stored with, if quantized."""
    mode = {"read": "whole"} if working_budget is None else {
        "read": "bounded", "working_budget": working_budget, "chunk": chunk, "method": method,
        "profile": _content_hash(profile)}
    if kv_bits:
        mode["stored"] = _bits_record(kv_bits)
    blob = json.dumps([STORE_FORMAT, model_identity, mode, document], separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _content_hash(profile) -> str | None:
    """What a profile selects with (SRHs, layer errors, defaults, geometry), hashed; not
    where it came from (its provenance)."""
    if profile is None:
        return None
    content = {k: v for k, v in profile.to_dict().items() if k != "provenance"}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def _bits_record(kv_bits: KVBits | None) -> dict | None:
    return {"bits": kv_bits.bits, "group_size": kv_bits.group_size} if kv_bits else None


def row_bytes(heads: int, dim: int, dtype: mx.Dtype, kv_bits: KVBits | None) -> int:
    """Bytes of one token's keys (or values) in a store file."""
    return kv_bits.row_bytes(heads, dim, dtype) if kv_bits else heads * dim * dtype.size


def layer_files(layer: int) -> tuple[str, str]:
    return f"{layer:03d}.keys", f"{layer:03d}.values"


class LayerRows:
    """Each layer's key and value rows as raw files in ``folder``, appended chunk by
    chunk (with running checksums) and read back one layer at a time."""

    def __init__(self, folder: Path, layers: int, kv_bits: KVBits | None = None):
        self.folder, self.tokens, self.kv_bits = Path(folder), 0, kv_bits
        self.shapes: list[tuple[int, int, int] | None] = [None] * layers
        self.crcs = [[0, 0] for _ in range(layers)]
        self.dtype: mx.Dtype | None = None

    def append(self, caches, rows: int):
        """Write the latest ``rows`` rows of every layer's cache (evaluated)."""
        for layer, cache in enumerate(caches):
            keys, values = (x[..., cache.length - rows : cache.length, :] for x in cache.keys_and_values())
            self.append_layer(layer, keys, values)
        self.tokens += rows

    def append_layer(self, layer: int, keys: mx.array, values: mx.array):
        """Write one layer's new rows, ``[1, kv_heads, rows, dim]`` each (call
        :meth:`advance` once every layer has them)."""
        self.dtype = self.dtype or keys.dtype
        self.shapes[layer] = (keys.shape[1], keys.shape[3], values.shape[3])
        for i, (name, x) in enumerate(zip(layer_files(layer), (keys, values))):
            data = _raw(x, self.kv_bits)
            self.crcs[layer][i] = zlib.crc32(data, self.crcs[layer][i])
            with open(self.folder / name, "ab") as f:
                f.write(data)

    def restore_layer(self, layer: int, shape: tuple[int, int, int], dtype: mx.Dtype, data: list[np.ndarray]):
        """Write back one layer's files as :meth:`files` hold them (``data``: the key
        file's bytes, then the value file's)."""
        self.dtype, self.shapes[layer] = dtype, shape
        for i, (name, blob) in enumerate(zip(layer_files(layer), data)):
            self.crcs[layer][i] = zlib.crc32(blob, self.crcs[layer][i])
            with open(self.folder / name, "ab") as f:
                f.write(blob.tobytes())

    def advance(self, rows: int):
        self.tokens += rows

    def truncate(self, tokens: int | None = None):
        """Cut every file back to ``tokens`` rows (default :attr:`tokens`): an
        interrupted call's rows go."""
        self.tokens = self.tokens if tokens is None else tokens
        for layer in range(len(self.shapes)):
            for file in self.files(layer, self.tokens) or ():
                if file.path.exists():
                    os.truncate(file.path, file.nbytes)

    @property
    def nbytes(self) -> int:
        """Bytes of the rows written."""
        return sum(f.nbytes for layer in range(len(self.shapes)) for f in self.files(layer) or ())

    def files(self, layer: int, rows: int | None = None) -> tuple["RowFile", "RowFile"] | None:
        """Layer ``layer``'s key and value files (of ``rows`` rows, default all); None
        before any row."""
        if self.shapes[layer] is None:
            return None
        heads, key_dim, value_dim = self.shapes[layer]
        rows = self.tokens if rows is None else rows
        return tuple(RowFile(self.folder / name, self.dtype, rows, heads, dim, self.kv_bits)
                     for name, dim in zip(layer_files(layer), (key_dim, value_dim)))


def _raw(x: mx.array, kv_bits: KVBits | None = None) -> np.ndarray:
    """``[1, heads, rows, dim]`` cache rows as contiguous ``[rows, heads, ...]`` bytes:
    the values, or packed by ``kv_bits`` (packed values, scales, biases per head)."""
    if x.dtype not in _RAW:
        raise CKVError(f"a KV cache in {x.dtype} cannot be stored: use float32, float16 or bfloat16")
    if kv_bits is None:
        return _row_major(x)
    return np.concatenate([_row_major(a).view(np.uint8) for a in kv_bits.pack(x)], axis=-1)


def _row_major(x: mx.array) -> np.ndarray:
    """``[1, heads, rows, n]`` as a contiguous NumPy ``[rows, heads, n]``."""
    rows = x[0].transpose(1, 0, 2)
    return np.ascontiguousarray(np.array(rows.view(mx.uint16) if x.dtype == mx.bfloat16 else rows))


def _from_numpy(block: np.ndarray, dtype: mx.Dtype) -> mx.array:
    """A NumPy ``[rows, heads, n]`` block of ``dtype`` values as MLX ``[1, heads, rows, n]``."""
    x = mx.array(block)
    return (x.view(dtype) if dtype == mx.bfloat16 else x).transpose(1, 0, 2)[None]


@dataclass(frozen=True)
class RowFile:
    """One layer's keys or values on disk: ``rows`` rows of ``heads x dim`` values, or
    packed by ``kv_bits``."""

    path: Path
    dtype: mx.Dtype
    rows: int
    heads: int
    dim: int
    kv_bits: KVBits | None = None

    @property
    def nbytes(self) -> int:
        return self.rows * row_bytes(self.heads, self.dim, self.dtype, self.kv_bits)

    def copy_into(self, buffer: mx.array, at: int) -> mx.array:
        """``buffer`` (``[1, heads, >= at + rows, dim]``) with these rows at ``at`` (in
        the buffer's dtype, dequantized if packed), copied a block at a time, in place:
        memory grows by one block, not the file."""
        if not self.rows:
            return buffer
        width = row_bytes(1, self.dim, self.dtype, self.kv_bits)
        mapped = np.memmap(self.path, dtype=np.uint8, mode="r", shape=(self.rows, self.heads, width))
        for start in range(0, self.rows, READ_BLOCK_ROWS):
            block = self._rows(mapped[start : start + READ_BLOCK_ROWS])
            end = start + block.shape[2]
            buffer[..., at + start : at + end, :] = block
            mx.eval(buffer)
        return buffer

    def _rows(self, block: np.ndarray) -> mx.array:
        """A block of the file's bytes as ``[1, heads, rows, dim]`` values."""
        if self.kv_bits is None:
            return _from_numpy(block.view(_RAW[self.dtype]), self.dtype)
        words = self.dim * self.kv_bits.bits // 8
        groups = self.dim // self.kv_bits.group(self.dim) * self.dtype.size
        packed = (_from_numpy(np.ascontiguousarray(block[..., :words]).view(np.uint32), mx.uint32),
                  *(_from_numpy(np.ascontiguousarray(block[..., a : a + groups]).view(_RAW[self.dtype]), self.dtype)
                    for a in (words, words + groups)))
        return self.kv_bits.unpack(packed)


class StoreWriter(LayerRows):
    """Builds a store in a private folder; :meth:`publish` makes it visible at once."""

    def __init__(self, root: Path, key: str, layers: int, kv_bits: KVBits | None = None,
                 limit_bytes: int = DEFAULT_LIMIT_BYTES):
        root = Path(root)
        super().__init__(root / f".tmp-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}", layers, kv_bits)
        self.root, self.key, self.limit_bytes = root, key, limit_bytes
        self.error: CKVError | None = None
        try:
            self.folder.mkdir(parents=True)
        except OSError as e:
            raise disk_error(root, e) from None

    def append_layer(self, layer: int, keys: mx.array, values: mx.array):
        """As :class:`LayerRows`; a write that fails (a full disk) removes the folder and
        is reported by :meth:`publish`, so the reading it records goes on."""
        if self.error is not None:
            return
        try:
            super().append_layer(layer, keys, values)
        except OSError as e:
            self.abort()
            self.error = disk_error(self.root, e)

    def publish(self, queries: list[mx.array | None], others: dict | None = None) -> "Store":
        """Write the window queries, mlx-lm's caches of the layers that do not compress
        (``others``, by layer) and the manifest, :func:`prune` the root to make room for
        them within the writer's limit, then rename into place (if another process
        published the same store meanwhile, keep theirs). A store larger than the limit
        is refused (:class:`DiskError`): the root never holds more than its limit."""
        if self.error is not None:
            raise self.error
        if not all(q is None or isinstance(q, mx.array) for q in queries):
            raise TypeError("publish takes one array of window queries per layer (Session.remembered_queries)")
        try:
            named = {f"window.{i}": q for i, q in enumerate(queries) if q is not None}
            write_safetensors(self.folder / QUERIES, named)
            if others:
                write_caches(self.folder / OTHERS, others)
            manifest = self._manifest()
            size = _stored_bytes(manifest)
            if size > self.limit_bytes:
                self.abort()
                raise DiskError(f"the full cache ({size / 2**20:,.1f} MiB) is larger than the store's limit "
                                f"({self.limit_bytes / 2**20:,.1f} MiB): raise --store-limit to keep it on disk",
                                "larger than the store's limit")
            (self.folder / MANIFEST).write_text(json.dumps(manifest, indent=1))
            _fsync_folder(self.folder)
            prune(self.root, self.limit_bytes - size)
            os.rename(self.folder, self.root / self.key)
        except (OSError, RuntimeError) as e:  # RuntimeError: MLX's own write errors
            self.abort()
            if (self.root / self.key / MANIFEST).is_file():
                return open_store(self.root, self.key, kv_bits=self.kv_bits)
            raise disk_error(self.root, e if isinstance(e, OSError) else OSError(str(e))) from None
        return open_store(self.root, self.key, verify=False, kv_bits=self.kv_bits)

    def _manifest(self) -> dict:
        layers = []
        for layer, ((heads, key_dim, value_dim), crcs) in enumerate(zip(self.shapes, self.crcs)):
            files = {name: {"bytes": (self.folder / name).stat().st_size, "crc32": crc}
                     for name, crc in zip(layer_files(layer), crcs)}
            layers.append({"kv_heads": heads, "key_dim": key_dim, "value_dim": value_dim, "files": files})
        return {"format": STORE_FORMAT, "key": self.key, "tokens": self.tokens, "dtype": str(self.dtype),
                "kv_bits": _bits_record(self.kv_bits), "layers": layers, "files": {name: _file_record(self.folder / name) for name in (QUERIES, OTHERS)
                                            if (self.folder / name).exists()}}

    def abort(self):
        """Remove what was written (nothing half-written stays)."""
        shutil.rmtree(self.folder, ignore_errors=True)


def _file_record(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "crc32": zlib.crc32(path.read_bytes())}


def _fsync_folder(folder: Path):
    for path in folder.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())


@dataclass
class Store:
    """A published store: read one layer's rows, or the window queries."""

    path: Path
    manifest: dict

    @property
    def tokens(self) -> int:
        return self.manifest["tokens"]

    @property
    def nbytes(self) -> int:
        """Bytes on disk."""
        return sum(f["bytes"] for layer in self.manifest["layers"] for f in layer["files"].values())

    @property
    def kv_bits(self) -> KVBits | None:
        """The bits its rows are packed with (None: as computed)."""
        bits = self.manifest.get("kv_bits")
        return KVBits(bits["bits"], bits["group_size"]) if bits else None

    @property
    def dtype(self) -> mx.Dtype:
        return _DTYPES[self.manifest["dtype"]]

    def shape(self, layer: int) -> tuple[int, int, int]:
        """Layer ``layer``'s KV heads, key size and value size."""
        info = self.manifest["layers"][layer]
        return info["kv_heads"], info["key_dim"], info["value_dim"]

    def files(self, layer: int) -> tuple[RowFile, RowFile]:
        """Layer ``layer``'s key and value files."""
        heads, key_dim, value_dim = self.shape(layer)
        return tuple(RowFile(self.path / name, self.dtype, self.tokens, heads, dim, self.kv_bits)
                     for name, dim in zip(layer_files(layer), (key_dim, value_dim)))

    def queries(self) -> list[mx.array | None]:
        named = mx.load(str(self.path / QUERIES))
        return [named.get(f"window.{i}") for i in range(len(self.manifest["layers"]))]

    def others(self) -> dict[int, object]:
        """mlx-lm's caches of the layers that do not compress, at the document's end."""
        if OTHERS not in self.manifest["files"]:
            return {}
        return read_caches(self.path / OTHERS)

    def touch(self):
        """Mark as just used (what the least-recently-used limit goes by), if the folder lets us."""
        try:
            os.utime(self.path / MANIFEST)
        except OSError:
            pass


def open_store(root: Path, key: str, verify: bool = True, kv_bits: KVBits | None = None) -> Store | None:
    """The published store ``key`` under ``root``, or None if there is none. With
    ``verify``, every file's size and checksum is checked: a store that fails, or whose
    rows are packed otherwise than ``kv_bits`` says, is removed and
    :class:`StoreCorrupt` says so."""
    path = Path(root) / key
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return _corrupt(path, "its manifest is unreadable")
    if manifest.get("format") != STORE_FORMAT or manifest.get("key") != key:
        return _corrupt(path, f"format {manifest.get('format')!r}, expected {STORE_FORMAT}")
    if manifest.get("kv_bits") != _bits_record(kv_bits):
        return _corrupt(path, f"its rows are stored {_bits_text(manifest.get('kv_bits'))}, "
                              f"not {_bits_text(_bits_record(kv_bits))}")
    if verify:
        for name, record in _records(manifest):
            identity = _identity(path / name)
            if identity in _VERIFIED:
                continue
            problem = _check(path / name, record)
            if problem:
                return _corrupt(path, f"{name} {problem}")
            _VERIFIED.add(identity)
    store = Store(path, manifest)
    store.touch()
    return store


_VERIFIED: set[tuple] = set()  # files this process checksummed, by identity: each is read once, not per open


def _identity(path: Path) -> tuple | None:
    """What tells a file apart from a changed or replaced one: path, inode, size, mtime."""
    try:
        info = path.stat()
    except OSError:
        return None
    return str(path), info.st_ino, info.st_size, info.st_mtime_ns


def _bits_text(record: dict | None) -> str:
    return f"{record['bits']}-bit" if record else "as computed"


def _records(manifest: dict):
    for layer in manifest["layers"]:
        yield from layer["files"].items()
    yield from manifest["files"].items()


def _stored_bytes(manifest: dict) -> int:
    """What a store's files hold (its manifest aside): what its limit counts."""
    return sum(record["bytes"] for _, record in _records(manifest))


def _check(path: Path, record: dict) -> str | None:
    try:
        size = path.stat().st_size
        if size != record["bytes"]:
            return f"is {size:,} bytes, not {record['bytes']:,}"
        crc = 0
        with open(path, "rb") as f:
            while block := f.read(1 << 24):
                crc = zlib.crc32(block, crc)
    except OSError as e:
        return f"is unreadable ({e.strerror})"
    return None if crc == record["crc32"] else "fails its checksum"


def _corrupt(path: Path, why: str):
    shutil.rmtree(path, ignore_errors=True)
    raise StoreCorrupt(f"the stored cache {path.name} was damaged ({why}) and has been removed")


class DiskError(CKVError):
    """The disk refused a store: the message (for the local user) names the folder; a
    server tells its clients only :attr:`reason`."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def disk_error(root: Path, error: OSError) -> DiskError:
    """One line for a store that cannot be written: why, and what to do."""
    if error.errno == errno.ENOENT:
        return DiskError(f"the full cache on disk was removed while in use ({error.filename or root}): "
                         "read the document again", "a stored cache was removed while in use")
    reason = "the disk is full" if error.errno == errno.ENOSPC else (error.strerror or str(error))
    return DiskError(f"cannot write the full cache to {root}: {reason}; free some space or choose a writable "
                     "folder with --store-dir", reason)


def list_stores(root: Path) -> list[dict]:
    """Every published store under ``root``, most recently used first."""
    found = []
    for manifest in Path(root).glob(f"*/{MANIFEST}"):
        if manifest.parent.name.startswith("."):  # a writer's folder, not yet published
            continue
        try:
            info = json.loads(manifest.read_text())
            used = manifest.stat().st_mtime
        except (OSError, ValueError):
            continue
        if not isinstance(info, dict) or info.get("format") != STORE_FORMAT:  # not ours (a future format): left alone
            continue
        size = _stored_bytes(info)
        found.append({"key": manifest.parent.name, "tokens": info.get("tokens"), "bytes": size, "used": used,
                      "path": manifest.parent})
    return sorted(found, key=lambda s: -s["used"])


def prune(root: Path, limit_bytes: int) -> list[str]:
    """Remove the least recently used stores until the rest fit in ``limit_bytes``
    (never a store a running conversation reads: its lease), and leftovers of writers
    and conversations that died; returns the keys removed. The one pruning path: every
    publish runs it (:meth:`StoreWriter.publish`), a server's start, and ``ckv-stores prune``."""
    removed, total, leased = [], 0, _leased(root)
    for store in list_stores(root):
        total += store["bytes"]
        if total > limit_bytes and store["key"] not in leased:
            shutil.rmtree(store["path"], ignore_errors=True)
            removed.append(store["key"])
            total -= store["bytes"]
    for tmp in Path(root).glob(".tmp-*"):
        if not _alive(tmp.name.rsplit("-", 2)[1]):
            shutil.rmtree(tmp, ignore_errors=True)
    for tail in Path(root).glob(f"{CONVERSATIONS}/*"):
        if not _alive(tail.name.split("-", 1)[0]):
            shutil.rmtree(tail, ignore_errors=True)
    return removed


def _leased(root: Path) -> set[str]:
    """The stores that live processes' conversations read (their lease files name them)."""
    keys = set()
    for lease in Path(root).glob(f"{CONVERSATIONS}/*/{LEASE}"):
        try:
            if _alive(lease.parent.name.split("-", 1)[0]):
                keys.add(lease.read_text().strip())
        except OSError:
            continue
    return keys


def _alive(pid: str) -> bool:
    """Whether process ``pid`` (a writer's, from its folder name) still runs."""
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True
