"""A cache that mlx-lm's own ``generate_step`` drives: it compresses by itself.

mlx-lm reads a prompt in chunks (evaluating every cache's ``state`` after each), then its
last token alone, then one generated token per call. A :class:`CompressingKVCache` keeps
every row while the prompt is read; when the first generated token arrives (a one-token
call right after another with no ``state`` read between, after rows were read since the
last selection), it selects its layer's budget with its method's window, whose newest
query is the prompt's last token, exactly when ``python -m ckv_mlx.generate`` compresses.
From then on it re-scores and evicts back to its budget whenever its region is full.

Its ``state`` adds what selection needs to :class:`~ckv_mlx.kv.cache.EvictingKVCache`'s: the
layer's policy (method, SRHs, budgets; a JSON string) and its window queries, so mlx-lm's
``save_prompt_cache`` / ``load_prompt_cache`` restore a cache that goes on compressing.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import mlx.core as mx
import mlx_lm.models.cache as mlx_lm_cache

from .attention import LayerWindow
from .cache import EvictingKVCache
from ..errors import CKVError
from .eviction import compress_layer, prompt_budgets
from ..policy.methods import METHODS, PROFILED, Method, options
from .quantized import KVBits

POLICY_FIELDS = 4  # what the state adds: the policy, the window queries, the scale, the sinks


@dataclass(frozen=True)
class LayerPolicy:
    """How one layer compresses: everything but the rows and the window queries."""

    method: str  # the method's one name, options included (of the method that runs)
    layer: int  # the layer's index among those that compress (what SRHs and budgets refer to)
    budget: int  # the layer's share of ``prompt_budget``
    prompt_budget: int  # tokens per layer on average: a prompt no longer is kept whole
    kv_heads: int  # the geometry the cache was made for
    head_dim: int
    window: int
    kernel: int
    pooling: str
    srh_heads: list[int] | None = None  # the layer's SRHs (profiled methods)
    layer_errors: list[float] | None = None  # the profile's, for error-aware budgets at another average
    kv_bits: tuple[int, int | None] | None = None  # (bits, group size) of the kept rows; None: as computed
    profile: str | None = None  # the profile's model name (where the SRHs and layer errors came from)

    def made_method(self) -> Method:
        """The method this policy names, able to score this layer."""
        base, settings = options(self.method)
        kind = METHODS[base]
        defaults = {"window": self.window, "kernel": self.kernel, "pooling": self.pooling}
        method = kind(_LayerHeads(self.srh_heads, self.layer_errors), **defaults) if base in PROFILED else kind(**defaults)
        for attribute, value in settings.items():
            setattr(method, attribute, value)
        method.name = self.method
        return method

    def bits(self) -> KVBits | None:
        return KVBits(*self.kv_bits) if self.kv_bits else None


class _LayerHeads:
    """What a profile tells one layer's method: its SRHs and the layer errors."""

    def __init__(self, heads: list[int] | None, layer_errors: list[float] | None):
        self._heads, self.layer_errors = heads or [], layer_errors

    def srh_heads(self, layer: int) -> list[int]:
        return self._heads


class CompressingKVCache(EvictingKVCache):
    """An :class:`EvictingKVCache` of one layer that selects and evicts by itself under
    mlx-lm's generation loop (see the module's docstring)."""

    def __init__(self, policy: LayerPolicy | None = None, region: int | None = None):
        super().__init__(region)
        self.policy = policy
        self.method = policy.made_method() if policy else None
        self.window = LayerWindow(window=policy.window) if policy else None
        self._last_call = 0  # tokens of the latest call
        self._calls_since_read = 0  # calls since the latest ``state`` read
        self._unselected = True  # rows were read in a multi-token call since the last selection
        self._seen = True  # the latest call's attention was seen by the window

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        n = keys.shape[2]
        self._check(keys)
        if self._prompt_was_read(n):
            self.select()
        elif self.compressed and self.free_slots() < n:
            compress_layer(self, self.method, self.policy.layer, self.window, self.budget)
        self._unselected |= n > 1
        self._last_call, self._seen = n, False
        self._calls_since_read += 1
        return super().update_and_fetch(keys, values)

    def attended(self):
        """Called by the attention pass-through once the window has seen this call."""
        self._seen = True

    def _prompt_was_read(self, n: int) -> bool:
        """Whether this call feeds the first generated token: one token right after the
        prompt's last (one token, no ``state`` read between), rows read since the last
        selection (or none made yet)."""
        return (n == 1 and self._last_call == 1 and self._calls_since_read >= 1
                and (self._unselected or not self.compressed))

    def select(self, prompt_budget: int | None = None, budget: int | None = None):
        """Keep this layer's share of the prompt's rows, scored by the latest window (a
        prompt no longer than ``prompt_budget`` whole)."""
        prompt_budget, budget = prompt_budget or self.policy.prompt_budget, budget or self.policy.budget
        budget = prompt_budgets([budget], self.length, prompt_budget)[0]
        compress_layer(self, self.method, self.policy.layer, self.window, budget, self.policy.bits())
        self._unselected = False

    def _check(self, keys: mx.array):
        """Refuse a model this cache was not made for, and a model whose attention the
        window cannot see (its queries would be missing: selection would be wrong)."""
        if self.policy is None:
            raise CKVError("this cache has no compression policy: make it with ckv_mlx.make_prompt_cache")
        if (keys.shape[1], keys.shape[3]) != (self.policy.kv_heads, self.policy.head_dim):
            raise CKVError(f"this cache was made for {self.policy.kv_heads} KV heads of {self.policy.head_dim} "
                           f"values, the model gives {keys.shape[1]} of {keys.shape[3]}: make the cache with "
                           "ckv_mlx.make_prompt_cache for this model")
        if not self._seen and self._last_call:
            raise CKVError("the model's attention does not pass through ckv_mlx, so the cache cannot see its "
                           "queries: load the model after `import ckv_mlx` (or with ckv_mlx.load), or call "
                           "ckv_mlx.make_prompt_cache(model) once")

    @property
    def state(self) -> list:
        """:class:`EvictingKVCache`'s state, then the policy (JSON), the window's queries,
        the attention scale and sinks (mlx-lm's ``save_prompt_cache`` takes strings,
        floats and None). Reading it marks a pause in the calls (mlx-lm reads it after
        each prompt chunk)."""
        self._calls_since_read = 0
        return self._state()

    @state.setter
    def state(self, v):
        policy, queries, scale, sinks = v[-POLICY_FIELDS:]
        if policy is not None:
            spec = json.loads(policy)
            self.__init__(LayerPolicy(**{**spec, "kv_bits": tuple(spec["kv_bits"]) if spec["kv_bits"] else None}))
            self.window.restore_window_state(queries)
            self.window.scale, self.window.sinks = scale, sinks
        EvictingKVCache.state.fset(self, v[:-POLICY_FIELDS])
        self._last_call, self._unselected = 1, not self.compressed

    def _state(self) -> list:
        window = self.window
        policy = None if self.policy is None else json.dumps(asdict(self.policy))
        if window is None:
            return [*super().state, policy, None, None, None]
        return [*super().state, policy, window.remembered(), window.scale, window.sinks]

    def copy(self) -> "CompressingKVCache":
        """An independent copy, policy and window queries included."""
        twin = type(self).from_state(self._state())
        if self.keys is not None:  # rows are written in place: the copy gets its own
            twin.keys, twin.values = mx.array(twin.keys), mx.array(twin.values)
        return twin


mlx_lm_cache.CompressingKVCache = CompressingKVCache  # what mlx-lm's load_prompt_cache finds a saved one by
