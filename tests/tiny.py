"""Tiny random mlx-lm models of each supported family, for fast exact tests."""

from __future__ import annotations

import importlib

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache, make_prompt_cache

MODULES = {"mistral": "llama"}  # model_type -> mlx-lm module, where they differ
FAMILY_ARGS = {  # what each family needs beside the common arguments, small
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "decoder_sparse_step": 1, "mlp_only_layers": [],
                  "moe_intermediate_size": 32, "norm_topk_prob": True},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "phi3": {"partial_rotary_factor": 0.5},  # RoPE on half of each head
    "smollm3": {"no_rope_layer_interval": 2},  # every 2nd layer without RoPE
    "ministral3": {"rope_parameters": {"rope_theta": 10000.0, "rope_type": "default", "llama_4_scaling_beta": 0.1,
                                       "original_max_position_embeddings": 16}},  # query scaling past 16 tokens
}
LINEAR = {"linear_num_value_heads": 2, "linear_num_key_heads": 2, "linear_key_head_dim": 16,
          "linear_value_head_dim": 16, "linear_conv_kernel_dim": 4, "full_attention_interval": 2}
MIXED_ARGS = {  # families whose layers mix kinds; every other layer compresses
    "gemma3_text": {"sliding_window": 8, "sliding_window_pattern": 2, "query_pre_attn_scalar": 16,
                    "rope_local_base_freq": 10000.0},
    "gpt_oss": {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 8},
    "qwen3_next": {**LINEAR, **FAMILY_ARGS["qwen3_moe"], "shared_expert_intermediate_size": 32,
                   "partial_rotary_factor": 0.5},
    "qwen3_5": {**LINEAR, "rope_parameters": {"type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}},
    "gemma4_text": {"sliding_window": 8, "sliding_window_pattern": 2, "global_head_dim": 32,
                    "vocab_size_per_layer_input": 128, "hidden_size_per_layer_input": 32},
}
FAMILY_ARGS.update(MIXED_ARGS)
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", *FAMILY_ARGS, "mistral3")


def tiny_model(arch: str = "llama", seed: int = 0, **shape):
    """A float32 model with random weights, built from mlx-lm's own ``Model`` and
    ``ModelArgs`` (:func:`tiny_config`); ``hidden = heads * head_dim``. ``mistral3``
    wraps a ``ministral3``."""
    return model_of(tiny_config(arch, **shape), seed)


def model_of(config: dict, seed: int = 0):
    """mlx-lm's model of ``config``, random weights from ``seed``."""
    arch = config["model_type"]
    module = importlib.import_module(f"mlx_lm.models.{MODULES.get(arch, arch)}")
    mx.random.seed(seed)
    model = module.Model(module.ModelArgs.from_dict(config))
    mx.eval(model.parameters())
    return model


def tiny_config(arch: str = "llama", layers: int = 2, heads: int = 4, kv_heads: int = 2, head_dim: int = 16,
                vocab: int = 128) -> dict:
    """The ``config.json`` of a tiny model of family ``arch``."""
    config = {
        "model_type": arch,
        "hidden_size": heads * head_dim,
        "num_hidden_layers": layers,
        "intermediate_size": 2 * heads * head_dim,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": 1e-5,
        "vocab_size": vocab,
        "rope_theta": 10000.0,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": True,
        **FAMILY_ARGS.get(arch, {}),
    }
    if arch == "gemma4_text":  # the last two layers read the KV of the last two before them
        config["num_kv_shared_layers"] = 2 if layers >= 4 else 0
    if arch == "gpt_oss":
        config["layer_types"] = ["sliding_attention", "full_attention"] * (layers // 2) + ["sliding_attention"] * (layers % 2)
    if arch == "mistral3":
        config = {"model_type": arch, "text_config": {**config, **FAMILY_ARGS["ministral3"], "model_type": "ministral3"}}
    return config


class TinyTokenizer:
    """Just what :class:`ckv_mlx.engine.session.Session` asks of a tokenizer."""

    eos_token_ids: set[int] = set()


def plain_greedy(model, tokens, n):
    """Greedy tokens of plain mlx-lm (its own KV cache): the independent reference."""
    cache = make_prompt_cache(model)
    logits = model(mx.array([tokens]), cache=cache)[:, -1]
    out = []
    for _ in range(n):
        out.append(mx.argmax(logits, axis=-1).item())
        logits = model(mx.array([[out[-1]]]), cache=cache)[:, -1]
    return out


def plain_logits(model, prompt, forced):
    """Logits of plain mlx-lm (its own caches): the prompt, then one forced token per step."""
    cache = make_prompt_cache(model)
    out = [model(mx.array([prompt]), cache=cache)[:, -1]]
    return out + [model(mx.array([[t]]), cache=cache)[:, -1] for t in forced]


def session_logits(session, prompt, forced):
    """The same through ``session``: the prompt read and compressed to its own length
    (nothing to evict), then one forced token per step."""
    out = [session.prefill(prompt)]
    session.compress(len(prompt))
    for token in forced:
        session.make_room(1)
        out.append(session.model(mx.array([[token]]), cache=session.model_caches())[:, -1])
    return out


HALF = {"bfloat16": mx.bfloat16, "float16": mx.float16}


def mac_model(arch: str = "llama", dtype: str = "bfloat16", **kwargs):
    """:func:`tiny_model` as a Mac runs a model: 4-bit weights kept quantized, the rest
    (and so activations and KV) in ``dtype``."""
    import mlx.nn as nn

    model = tiny_model(arch, **kwargs)
    nn.quantize(model, group_size=32, bits=4)
    model.set_dtype(HALF[dtype])
    mx.eval(model.parameters())
    return model


def as_mlx_lm_quantizes(cache, rows: int, bits: int, group_size: int, start: int = 0):
    """Rows ``start:rows`` of every plain ``KVCache`` in ``cache`` as mlx-lm's
    ``QuantizedKVCache`` holds them (``mx.quantize``), dequantized back in place."""
    for c in cache:
        if type(c) is KVCache:
            for x in (c.keys, c.values):
                x[..., start:rows, :] = mx.dequantize(
                    *mx.quantize(x[..., start:rows, :], group_size=group_size, bits=bits), group_size=group_size,
                    bits=bits)


def quantized_plain_logits(model, prompt, forced, bits, group_size):
    """:func:`plain_logits` with the prompt's rows in the growing layers quantized as
    mlx-lm quantizes them; the forced tokens' rows in full precision."""
    cache = make_prompt_cache(model)
    out = [model(mx.array([prompt]), cache=cache)[:, -1]]
    as_mlx_lm_quantizes(cache, len(prompt), bits, group_size)
    return out + [model(mx.array([[t]]), cache=cache)[:, -1] for t in forced]


def masked_plain_logits(model, prompt, forced, kept, kv_bits=None):
    """Plain mlx-lm attention over the full cache, with evicted rows masked out (and
    with ``kv_bits`` = ``(bits, group_size)`` the prompt's rows quantized as mlx-lm
    quantizes them)."""
    cache = make_prompt_cache(model)
    model(mx.array([prompt]), cache=cache)
    if kv_bits:
        as_mlx_lm_quantizes(cache, len(prompt), *kv_bits)
    out = []
    for token in forced:
        h = model.model.embed_tokens(mx.array([[token]]))
        for layer, (block, c) in enumerate(zip(model.layers, cache)):
            visible = np.zeros((block.self_attn.n_kv_heads, c.offset + 1), dtype=bool)
            rows = np.broadcast_to(np.array(kept[layer]), (visible.shape[0], kept[layer].shape[-1]))
            np.put_along_axis(visible, rows, True, axis=1)
            visible[:, len(prompt):] = True
            group = block.self_attn.n_heads // block.self_attn.n_kv_heads
            mask = mx.array(np.repeat(visible, group, axis=0)[None, :, None, :])
            h = block(h, mask, c)
        out.append(model.model.embed_tokens.as_linear(model.model.norm(h))[:, -1])
    return out
