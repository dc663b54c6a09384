"""Kept rows stored quantized: fewer bits per token on top of fewer tokens.

A compressed layer keeps its selected rows packed as ``mx.quantize`` packs them (affine,
per row, ``group_size`` values sharing a scale and a bias, as mlx-lm's
``QuantizedKVCache``), and the tokens that arrived since in full precision. Attention
reads both where they lie (:func:`attention`): ``mx.quantized_matmul`` over the packed
rows, a plain product over the rest, one softmax over all, so no step dequantizes the
layer. Quantization is per row, so packing a selection of rows equals selecting rows of
the packed layer: rows kept again at a re-score stay bit for bit what they were.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import mlx.core as mx

from ..errors import CKVError

BITS = (4, 8)
AS_COMPUTED = 16  # --kv-bits 16: the kept rows in the model's own dtype
KV_BITS_CHOICES = (AS_COMPUTED, *BITS)
DEFAULT_BITS = 8  # docs/results.md: the same answers and KL as unquantized rows, in about half the bytes
GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 64  # mlx-lm's --kv-group-size

Packed = tuple  # (weights uint32, scales, biases), each [1, kv_heads, rows, ...]
KV_BITS_HELP = ("store the rows each layer keeps quantized to this many bits per value (mx.quantize, as mlx-lm's "
                f"--kv-bits), the region's new tokens in full precision until the next re-score; {AS_COMPUTED}: as "
                f"computed (default {DEFAULT_BITS} for a compressing method, as computed where no group divides the "
                "head size)")
AS_COMPUTED_NOTE = (f"no group mx.quantize packs divides this model's head size: the kept rows stay as computed "
                    f"(the default --kv-bits {DEFAULT_BITS} does not apply)")
STORE_BITS_HELP = ("keep the full cache on disk packed to this many bits per value (8: about half the bytes each "
                   "question reads back; the selection then scores the packed rows), in groups of --kv-group-size "
                   "(default: as computed)")
GROUP_SIZE_HELP = (f"values sharing one scale and bias with --kv-bits (default {DEFAULT_GROUP_SIZE}, as mlx-lm, or "
                   f"{min(GROUP_SIZES)} for a head size {DEFAULT_GROUP_SIZE} does not divide)")


@dataclass(frozen=True)
class KVBits:
    """How kept rows are quantized: ``bits`` per value, ``group_size`` values per scale
    (None: mlx-lm's 64, or 32 for a head size 64 does not divide, e.g. 96)."""

    bits: int
    group_size: int | None = None
    implied: bool = field(default=False, compare=False)  # the default, not asked for: dropped where it cannot pack

    def __post_init__(self):
        if self.bits not in BITS:
            raise CKVError(f"--kv-bits {self.bits} is not supported: use {' or '.join(map(str, BITS))}")
        if self.group_size is not None and self.group_size not in GROUP_SIZES:
            raise CKVError(f"--kv-group-size {self.group_size} is not supported: use one of "
                           f"{', '.join(map(str, GROUP_SIZES))}")

    def group(self, dim: int) -> int:
        """The group size for rows of ``dim`` values, refused in one line where none divides it."""
        if self.group_size is not None:
            if dim % self.group_size:
                raise CKVError(f"head size {dim} is not a multiple of --kv-group-size {self.group_size}: "
                               "use a group size that divides it")
            return self.group_size
        fitting = [g for g in (DEFAULT_GROUP_SIZE, min(GROUP_SIZES)) if dim % g == 0]
        if not fitting:
            raise CKVError(f"head size {dim} is not a multiple of {min(GROUP_SIZES)}, the smallest group mx.quantize "
                           "packs: this model's rows cannot be quantized; run without --kv-bits / --store-bits")
        return fitting[0]

    def pack(self, rows: mx.array) -> Packed:
        """``[1, kv_heads, rows, dim]`` rows quantized."""
        return tuple(mx.quantize(rows, group_size=self.group(rows.shape[-1]), bits=self.bits))

    def unpack(self, packed: Packed) -> mx.array:
        """Packed rows back in their dtype (the scales')."""
        return mx.dequantize(*packed, group_size=self.group(packed_dim(packed, self.bits)), bits=self.bits)

    def row_bytes(self, kv_heads: int, dim: int, dtype: mx.Dtype) -> int:
        """Bytes of one token's packed keys or values: ``bits`` per value, plus a scale
        and a bias in ``dtype`` per group."""
        return kv_heads * (dim * self.bits // 8 + 2 * (dim // self.group(dim)) * dtype.size)


def kv_bits_setting(bits: int | None, group_size: int | None, compresses: bool = True,
                    store_bits: int | None = None) -> KVBits | None:
    """The ``--kv-bits`` / ``--kv-group-size`` choice (None: not given, so 8 bits for a
    compressing method; 16: as computed), refused in one line where it cannot apply (a
    method that keeps every row, a group size for no bits at all)."""
    if bits is None and compresses:
        return KVBits(DEFAULT_BITS, group_size, implied=True)
    if bits in (None, AS_COMPUTED):
        if group_size is not None and store_bits is None:
            raise CKVError("--kv-group-size groups the values --kv-bits or --store-bits pack, and here nothing is "
                           f"packed: drop it, or add --kv-bits {' or '.join(map(str, BITS))} with a compressing method")
        return None
    if not compresses:
        raise CKVError("--kv-bits packs the rows a method keeps, and --method full keeps every row as computed: "
                       f"choose a compressing method, or --kv-bits {AS_COMPUTED}")
    return KVBits(bits, group_size)


def for_heads(kv_bits: KVBits | None, head_dims) -> KVBits | None:
    """``kv_bits`` as they apply to heads of ``head_dims`` values: refused in one line
    where asked for and no group divides a head size; the default is dropped there."""
    try:
        for dim in sorted(head_dims) if kv_bits else ():
            kv_bits.group(dim)
    except CKVError:
        if kv_bits.implied:
            return None
        raise
    return kv_bits


def store_bits_setting(bits: int | None, group_size: int | None) -> KVBits | None:
    """The ``--store-bits`` choice, in groups of ``--kv-group-size``."""
    return KVBits(bits, group_size) if bits else None


class QuantizedRows(NamedTuple):
    """A layer's keys (or values) as attention reads them: packed rows, then full ones."""

    packed: Packed
    rest: mx.array  # [1, kv_heads, rows, dim], the tokens since the last re-score
    kv_bits: KVBits

    @property
    def shape(self) -> tuple[int, ...]:
        """As a plain array of all the rows would have it."""
        batch, heads, rows, dim = self.rest.shape
        return batch, heads, self.packed[0].shape[2] + rows, dim


def packed_rows(packed: Packed) -> int:
    return packed[0].shape[2]


def packed_dim(packed: Packed, bits: int) -> int:
    """Values per row of ``packed`` (32-bit words of ``bits``-bit values)."""
    return packed[0].shape[-1] * 32 // bits


def take(packed: Packed, rows: mx.array) -> Packed:
    """Rows ``rows`` (``[kv_heads or 1, k]``) of every array of ``packed``."""
    return tuple(take_rows(x, rows) for x in packed)


def joined(first: Packed, second: Packed) -> Packed:
    """Packed rows one after the other."""
    return tuple(mx.concatenate([a, b], axis=2) for a, b in zip(first, second))


def cut(packed: Packed, rows: int) -> Packed:
    """The first ``rows`` rows."""
    return tuple(x[..., :rows, :] for x in packed)


def take_rows(x: mx.array, rows: mx.array) -> mx.array:
    """Gather ``rows`` (``[heads or 1, k]``) along the sequence axis of ``x``."""
    heads, width = x.shape[1], x.shape[3]
    index = mx.broadcast_to(rows[None, :, :, None], (1, heads, rows.shape[-1], width))
    return mx.take_along_axis(x, index, axis=2)


def attention(queries: mx.array, keys: QuantizedRows, values: QuantizedRows, scale: float, mask=None,
              sinks: mx.array | None = None) -> mx.array:
    """Attention of ``queries`` ``[1, n_heads, L, dim]`` over packed-then-full rows, as
    mlx-lm's quantized attention computes it (in the queries' dtype, a precise softmax),
    with ``mask`` as mlx-lm passes it ("causal", boolean or additive) and learned
    ``sinks`` taking their share of each row's mass."""
    batch, n_heads, length, dim = queries.shape
    kv_heads = keys.rest.shape[1]
    group, kv_bits = n_heads // kv_heads, keys.kv_bits
    quantized = dict(group_size=kv_bits.group(dim), bits=kv_bits.bits)
    # A KV head's queries side by side as the rows of one product: no broadcast axis.
    q = (queries * scale).reshape(batch, kv_heads, group * length, dim)
    scores = mx.concatenate([mx.quantized_matmul(q, *keys.packed, transpose=True, **quantized),
                             q @ keys.rest.swapaxes(-1, -2)], axis=-1)
    scores = _masked(scores.reshape(batch, kv_heads, group, length, -1), mask)
    if sinks is None:
        probs = mx.softmax(scores, axis=-1, precise=True)
    else:
        sink = sinks.astype(mx.float32).reshape(kv_heads, group, 1, 1)
        lse = mx.logaddexp(mx.logsumexp(scores.astype(mx.float32), axis=-1, keepdims=True), sink)
        probs = mx.exp(scores.astype(mx.float32) - lse).astype(scores.dtype)
    probs = probs.reshape(batch, kv_heads, group * length, -1)
    split = packed_rows(keys.packed)
    out = mx.quantized_matmul(probs[..., :split], *values.packed, transpose=False, **quantized)
    out = out + probs[..., split:] @ values.rest
    return out.reshape(batch, n_heads, length, -1)


def _masked(scores: mx.array, mask) -> mx.array:
    """``scores`` ``[1, kv_heads, group, L, N]`` with mlx-lm's mask applied."""
    if mask is None:
        return scores
    if isinstance(mask, str):
        length, rows = scores.shape[-2:]
        mask = mx.arange(rows - length, rows)[:, None] >= mx.arange(rows)[None]
    if mask.ndim > 3 and mask.shape[1] > 1:  # per query head: [1, n_heads, L, N]
        mask = mask.reshape(*scores.shape[:3], *mask.shape[-2:])
    elif mask.ndim > 3:
        mask = mx.expand_dims(mask, -3)
    if mask.dtype == mx.bool_:
        return mx.where(mask, scores, mx.finfo(scores.dtype).min)
    return scores + mask
