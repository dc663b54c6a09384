"""Splitting a model over the ranks, as mlx-lm does: by heads (tensor parallel, its
``Model.shard``) or by layers (pipeline parallel, its ``PipelineMixin``). A family mlx-lm
cannot split that way, or a shape the group does not divide, is refused in one line
from ``config.json`` alone, before any weights load."""

from __future__ import annotations

import importlib
from types import ModuleType

from ..errors import CKVError
from ..model.families import SUPPORTED


def _module(model_type: str) -> ModuleType:
    from mlx_lm.utils import MODEL_REMAPPING

    return importlib.import_module(f"mlx_lm.models.{MODEL_REMAPPING.get(model_type, model_type)}")


def splits(model_type: str, pipeline: bool) -> bool:
    """Whether mlx-lm splits a ``model_type`` model by layers (``pipeline``) or by heads."""
    from mlx_lm.models.pipeline import PipelineMixin

    module = _module(model_type)
    if pipeline:
        return any(isinstance(v, type) and issubclass(v, PipelineMixin) and v is not PipelineMixin
                   for v in vars(module).values())
    return hasattr(module.Model, "shard")


def way(pipeline: bool) -> str:
    return "by layers (--pipeline)" if pipeline else "by heads (tensor parallel)"


def check_shardable(config: dict, name: str, ranks: int, pipeline: bool) -> None:
    """Refuse, in one line, a model mlx-lm cannot split over ``ranks`` processes this way."""
    model_type = config.get("model_type")
    if not splits(model_type, pipeline):
        families = ", ".join(f for f in SUPPORTED if splits(f, pipeline))
        hint = f"split it {way(not pipeline)}" if splits(model_type, not pipeline) else "run it on one machine"
        raise CKVError(f"{name}: mlx-lm cannot split a {model_type} model {way(pipeline)} (it can split {families}): "
                       f"{hint}")
    text = config.get("text_config", config)
    if pipeline:
        layers = text["num_hidden_layers"]
        if layers < ranks:
            raise CKVError(f"{name}: {layers} layers cannot be split over {ranks} processes: use at most {layers}")
        return
    heads = text["num_attention_heads"]
    kv_heads = text.get("num_key_value_heads") or heads
    if heads % ranks or kv_heads % ranks:
        fits = [n for n in range(1, kv_heads + 1) if heads % n == 0 and kv_heads % n == 0]
        raise CKVError(f"{name}: {heads} query heads and {kv_heads} KV heads cannot be split evenly over {ranks} "
                       f"processes: use {' or '.join(map(str, fits))} processes, or --pipeline where mlx-lm has it")
