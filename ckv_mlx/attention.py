"""The GQA attention port: mlx-lm's attention that also keeps the window queries.

It reuses the model's own projections, norms and RoPE, so parameter names and outputs
are unchanged; the only addition is the last ``window`` post-RoPE queries, which
scoring needs and ``mx.fast.scaled_dot_product_attention`` never exposes.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .errors import CKVError
from .models import SUPPORTED_ARCHITECTURES
from .profiles import Defaults


class WindowAttention(nn.Module):
    """Grouped-query attention that remembers its latest ``window`` queries.

    ``tap``, when set, sees every call's post-RoPE queries, cached keys and values and
    per-head output ``[b, n_heads, n, head_dim]`` (before ``o_proj``) and returns the
    output to use: the profiler records attention with it, the ablation masks heads.
    """

    def __init__(self, base: nn.Module, window: int = Defaults.window):
        super().__init__()
        self.n_heads = base.n_heads
        self.n_kv_heads = base.n_kv_heads
        self.scale = base.scale
        self.q_proj, self.k_proj = base.q_proj, base.k_proj
        self.v_proj, self.o_proj = base.v_proj, base.o_proj
        self.q_norm = getattr(base, "q_norm", None)
        self.k_norm = getattr(base, "k_norm", None)
        self.rope = base.rope
        self.window = window  # the latest queries that score
        self.kept = window  # the latest queries remembered: the widest window installed so far
        self.tap = None
        self._pieces: list[mx.array] = []  # the latest queries, oldest first, joined only when read
        self._held = 0

    @property
    def window_queries(self) -> mx.array:
        """The latest post-RoPE queries that score, ``[n_heads, <= window, head_dim]``."""
        return self.remembered()[0, :, -self.window :, :]

    @property
    def queries_held(self) -> int:
        """How many of the latest queries are remembered (at most :attr:`kept`)."""
        return self._held

    def remembered(self) -> mx.array | None:
        """Every query remembered, ``[1, n_heads, queries_held, head_dim]`` (e.g. to save)."""
        if len(self._pieces) > 1:
            self._pieces = [mx.concatenate(self._pieces, axis=2)]
        return self._pieces[0] if self._pieces else None

    def set_window(self, window: int):
        """Score with the latest ``window`` queries; remember at least that many from now on."""
        self.window = window
        self.keep(window)

    def keep(self, queries: int):
        """Remember at least the latest ``queries`` queries from now on."""
        self.kept = max(self.kept, queries)

    def reset(self):
        self._pieces, self._held = [], 0

    def window_state(self) -> tuple:
        """What is remembered, for :meth:`restore_window_state` (cheap: references)."""
        return tuple(self._pieces)

    def restore_window_state(self, state: tuple | mx.array | None):
        """Go back to a :meth:`window_state`, or to queries saved as one array."""
        pieces = [] if state is None else [state] if isinstance(state, mx.array) else list(state)
        self._pieces, self._held = pieces, sum(p.shape[2] for p in pieces)

    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
        b, n, _ = x.shape
        queries = self.q_proj(x).reshape(b, n, self.n_heads, -1)
        keys = self.k_proj(x).reshape(b, n, self.n_kv_heads, -1)
        values = self.v_proj(x).reshape(b, n, self.n_kv_heads, -1)
        if self.q_norm is not None:
            queries, keys = self.q_norm(queries), self.k_norm(keys)
        queries = queries.transpose(0, 2, 1, 3)
        keys = keys.transpose(0, 2, 1, 3)
        values = values.transpose(0, 2, 1, 3)

        offset = 0 if cache is None else cache.offset
        queries = self.rope(queries, offset=offset)
        keys = self.rope(keys, offset=offset)
        self._remember(queries)
        if cache is not None:
            keys, values = cache.update_and_fetch(keys, values)

        out = mx.fast.scaled_dot_product_attention(
            queries, keys, values, scale=self.scale, mask=mask
        )
        if self.tap is not None:
            out = self.tap(self, queries, keys, values, out)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(b, n, -1))

    def _remember(self, queries: mx.array):
        """Keep the latest :attr:`kept` queries; a decode step appends its one query to a
        list (no copy: joining waits until the queries are read)."""
        if queries.shape[2] >= self.kept:  # a copy: a view would keep the whole chunk's queries alive
            self._pieces, self._held = [mx.contiguous(queries[:, :, -self.kept :, :])], self.kept
            return
        self._pieces.append(queries)
        self._held += queries.shape[2]
        while self._held - self._pieces[0].shape[2] >= self.kept:
            self._held -= self._pieces.pop(0).shape[2]
        if self._held > self.kept:  # part of the oldest piece is one too many
            self._pieces[0] = mx.contiguous(self._pieces[0][:, :, self._held - self.kept :, :])
            self._held = self.kept


def joined(state: tuple) -> mx.array | None:
    """The queries of a :meth:`WindowAttention.window_state` as one array (to save)."""
    return mx.concatenate(list(state), axis=2) if state else None


def architecture(model: nn.Module) -> str:
    """The model's mlx-lm architecture name, refusing unsupported ones."""
    arch = getattr(model, "model_type", None) or getattr(model.args, "model_type", "")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CKVError(
            f"model architecture {arch!r} is not supported: use a "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} model"
        )
    if any(getattr(layer, "use_sliding", False) for layer in model.layers):
        raise CKVError("models with sliding-window layers are not supported yet")
    return arch


def install(model: nn.Module, window: int = Defaults.window) -> list[WindowAttention]:
    """Swap every layer's attention for :class:`WindowAttention` (idempotent).

    Returns the attention modules, one per layer.
    """
    architecture(model)
    for layer in model.layers:
        if not isinstance(layer.self_attn, WindowAttention):
            layer.self_attn = WindowAttention(layer.self_attn, window)
        layer.self_attn.set_window(window)
    return [layer.self_attn for layer in model.layers]
