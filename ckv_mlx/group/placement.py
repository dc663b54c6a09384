"""Which part of a model this process holds, read from the model mlx-lm sharded.

Pipeline parallel (``model.model.pipeline``): a run of layers, so a compressing layer's
budget and SRHs are those of its number in the whole model. Tensor parallel
(``model.shard``): every layer, with a slice of its query and KV heads. One process holds
everything: layers numbered from 0, every head.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.nn as nn

from ..model.families import compressible_layers, text_model
from ..policy.heads import HeadSlice
from .ranks import Ranks

SHARDED = (nn.AllToShardedLinear, nn.QuantizedAllToShardedLinear)


@dataclass(frozen=True)
class Placement:
    """``layers``: each compressing layer held here, its number among the whole model's
    compressing layers, which are its layers ``compressing`` of ``model_layers``;
    ``tensor``: the ranks sharing every layer's heads (None: all heads are here)."""

    layers: tuple[int, ...]
    compressing: tuple[int, ...]
    model_layers: int
    tensor: Ranks | None = None

    @property
    def total_layers(self) -> int:
        """The whole model's compressing layers (what budgets and SRHs are numbered over)."""
        return len(self.compressing)

    @property
    def split(self) -> bool:
        """Whether other processes hold parts of the model."""
        return self.tensor is not None or len(self.layers) < self.total_layers

    def mine(self, per_layer: list) -> list:
        """The entries of a whole-model ``per_layer`` list for the layers held here."""
        return [per_layer[layer] for layer in self.layers]

    def heads(self, query_heads: int, kv_heads: int) -> HeadSlice | None:
        """The slice of heads held here, each layer holding ``query_heads`` and ``kv_heads``."""
        if self.tensor is None:
            return None
        rank = self.tensor.rank
        return HeadSlice(rank * query_heads, rank * kv_heads, kv_heads * self.tensor.size, self.tensor.rows)


def placement(model: nn.Module) -> Placement:
    """Where ``model`` (as mlx-lm loaded it, sharded or not) sits in its group."""
    local = compressible_layers(model)
    inner = text_model(model).model
    if getattr(inner, "pipeline_size", 1) > 1:
        whole = type(model)(model.args)  # every layer, none loaded: which of them compress
        compressing = compressible_layers(whole)
        layers = tuple(n for n, layer in enumerate(compressing) if inner.start_idx <= layer < inner.end_idx)
        assert len(layers) == len(local), "mlx-lm's pipeline made caches for other layers than it runs"
        model_layers = len(whole.layers)
    else:
        compressing, layers, model_layers = tuple(local), tuple(range(len(local))), len(model.layers)
    sharded = next((m for _, m in model.named_modules() if isinstance(m, SHARDED)), None)
    tensor = Ranks(sharded.group) if sharded is not None and sharded.group.size() > 1 else None
    return Placement(layers, tuple(compressing), model_layers, tensor)
