"""The mlx-lm model families that compress, and which of their layers do.

A layer compresses when mlx-lm gives it a plain growing ``KVCache`` (``make_prompt_cache``):
its attention reads every row it has seen, so rows can be chosen. A layer mlx-lm gives
another cache (a sliding window's ``RotatingKVCache``, a linear-attention state) keeps
that cache as mlx-lm makes it. What a family's attention computes needs no port: the
window queries are seen where mlx-lm attends (``attention.py``), so a family is one line
here, and one tiny model in the tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import KVCache, make_prompt_cache

from ..errors import CKVError

SUPPORTED = (
    "llama", "mistral", "qwen2", "qwen3",  # plain GQA
    "qwen3_moe", "mixtral",  # GQA, mixture-of-experts MLP
    "ministral3", "mistral3",  # GQA with llama-4 query scaling; mistral3 wraps it (or llama) as text
    "phi3",  # fused qkv projection, partial RoPE
    "smollm3",  # llama with RoPE left out of every 4th layer (NoPE)
    "gemma3_text", "gemma3",  # 5 of 6 layers a 512-token sliding window; gemma3 wraps it as text
    "gemma4_text",  # sliding and full layers; the last ones read an earlier layer's KV (selected once for all)
    "gpt_oss",  # sliding and full layers alternating, learned attention sinks, MoE
    "qwen3_next", "qwen3_5",  # linear attention (GatedDeltaNet) with full attention every 4th layer
)
REFUSED = {  # what is known not to compress here, and why
    "deepseek_v2": "multi-head latent attention (MLA)", "deepseek_v3": "multi-head latent attention (MLA)",
    "deepseek_v32": "multi-head latent attention (MLA)", "kimi_k25": "multi-head latent attention (MLA)",
    "glm4_moe_lite": "multi-head latent attention (MLA)", "minicpm3": "multi-head latent attention (MLA)",
    "mamba": "a state-space model: no attention cache", "mamba2": "a state-space model: no attention cache",
    "rwkv7": "a recurrent model: no attention cache",
}


def check_config(config: dict, name: str) -> None:
    """Refuse, from ``config.json`` alone, a model whose family does not compress here."""
    model_type = config.get("model_type")
    if model_type in SUPPORTED:
        return
    why = f" ({REFUSED[model_type]})" if model_type in REFUSED else ""
    raise CKVError(f"{name}: architecture {model_type!r}{why} is not supported; "
                   f"use one of: {', '.join(SUPPORTED)}")


def check_config_file(path: Path, name: str) -> None:
    if not path.is_file():
        raise CKVError(f"{name}: no config.json found; pass an mlx-lm model folder")
    check_config(json.loads(path.read_text()), name)


def text_model(model: nn.Module) -> nn.Module:
    """The language model inside a multimodal wrapper (mistral3), else ``model``."""
    return getattr(model, "language_model", model)


def compressible_layers(model: nn.Module) -> list[int]:
    """The layers mlx-lm gives a plain growing ``KVCache``."""
    return [i for i, cache in enumerate(make_prompt_cache(model)) if type(cache) is KVCache]


def one_token_caches(model: nn.Module) -> list:
    """mlx-lm's caches after it reads one token: what each layer keeps, and in what shape."""
    caches = make_prompt_cache(model)
    mx.eval(model(mx.array([[0]]), cache=caches))
    return caches


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The attention module of every layer that compresses, once the family is checked:
    refused in one line if it is not supported or no layer compresses."""
    check_config({"model_type": getattr(model, "model_type", None) or model.args.model_type}, "the model")
    layers = compressible_layers(model)
    if not layers:
        raise CKVError("no layer of this model keeps a growing KV cache: there is nothing to compress")
    return [model.layers[i].self_attn for i in layers]
