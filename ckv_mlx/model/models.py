"""Load mlx-lm models (folder, hub id, or the built-in SmolLM2) and describe their shape."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import mlx.core as mx
import mlx.nn as nn
from huggingface_hub import hf_hub_download, snapshot_download
from huggingface_hub.errors import HFValidationError
from mlx.utils import tree_unflatten

from ..errors import CKVError
from ..group.placement import placement
from ..group.sharding import check_shardable
from .families import check_config_file, compressible_layers, one_token_caches, text_model
from .fingerprint import model_identity
from .gemma_gguf import GEMMA_MODEL, gemma_model_folder
from .gguf import BUILTIN_MODEL, builtin_model_folder
from ..engine.memory import kv_bytes_per_token

if TYPE_CHECKING:  # mlx_lm pulls in transformers (~1.5 s): imported only to load a model
    from mlx_lm.tokenizer_utils import TokenizerWrapper


@dataclass(frozen=True)
class ModelShape:
    """What a profile must match: the attention geometry of a model. ``layers`` counts
    the layers that compress (what SRH rows and layer budgets refer to); which of the
    model's ``total_layers`` they are is ``compressed_layers`` (empty: every layer)."""

    name: str
    architecture: str
    layers: int
    query_heads: int
    kv_heads: int
    head_dim: int
    compressed_layers: tuple[int, ...] = ()
    total_layers: int = 0

    def __post_init__(self):
        if not self.compressed_layers:
            object.__setattr__(self, "compressed_layers", tuple(range(self.layers)))
        object.__setattr__(self, "total_layers", self.total_layers or self.layers)

    def dims(self) -> str:
        layers = f"{self.layers} layers" if self.total_layers == self.layers else \
            f"{self.layers} of {self.total_layers} layers ({', '.join(map(str, self.compressed_layers))})"
        return f"{layers} x {self.query_heads} query heads / {self.kv_heads} KV heads, head_dim {self.head_dim}"

    def same_geometry(self, other: "ModelShape") -> bool:
        """Same compressing layers and heads: what SRH indices and layer budgets refer to."""
        return (self.compressed_layers, self.query_heads, self.kv_heads) == (
            other.compressed_layers, other.query_heads, other.kv_heads
        )


DEFAULT_MODEL = BUILTIN_MODEL
BUILTIN_MODELS = {BUILTIN_MODEL: builtin_model_folder, GEMMA_MODEL: gemma_model_folder}  # name -> its folder, converted on first use
MODEL_HELP = f"mlx-lm model folder, hub id, or a built-in model: {' or '.join(BUILTIN_MODELS)} (default: {DEFAULT_MODEL})"
PRECISIONS = ("float32", "native")
PRECISION_ENV = "CKV_PRECISION"
HALF_DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16}
QUANTIZED = (nn.QuantizedLinear, nn.QuantizedEmbedding, nn.QuantizedAllToShardedLinear,
             nn.QuantizedShardedToAllLinear)  # what float32 dequantizes


@dataclass
class LoadedModel:
    """A ready model: mlx-lm module, its tokenizer, and what callers need to know."""

    model: nn.Module
    tokenizer: TokenizerWrapper
    name: str
    shape: ModelShape
    context_length: int
    precision: str = "float32"
    identity: str = ""  # config, weights and precision hashed (see fingerprint.py): what stores are keyed by
    kv_bytes_per_token: int = 0  # what one token adds to a full cache (0: measured here)

    def __post_init__(self):
        self.kv_bytes_per_token = self.kv_bytes_per_token or kv_bytes_per_token(self.model)


def default_precision() -> str:
    """``$CKV_PRECISION``, else ``native`` on a GPU (Metal) and ``float32`` on a CPU,
    where dequantized float32 weights read a prompt ~100x faster than bfloat16 quantized ones."""
    chosen = os.environ.get(PRECISION_ENV)
    if chosen:
        return checked_precision(chosen, f"${PRECISION_ENV}")
    return "float32" if mx.default_device().type == mx.cpu else "native"


def checked_precision(precision: str, where: str = "precision") -> str:
    if precision not in PRECISIONS:
        raise CKVError(f"{where} {precision!r} is not a precision: use one of {', '.join(PRECISIONS)}")
    return precision


def load_model(name: str | None = None, precision: str | None = None, identify: bool = True,
               pipeline: bool = False) -> LoadedModel:
    """Load a built-in model (None: the default; or a name in :data:`BUILTIN_MODELS`), a
    local mlx-lm folder, or a Hugging Face id.

    Under ``mlx.launch`` (more than one rank) each rank loads its part with mlx-lm's
    ``sharded_load``: a slice of every layer's heads, or with ``pipeline`` a run of layers.

    ``precision`` (default :func:`default_precision`): ``float32`` dequantizes the
    weights to float32; ``native`` keeps them quantized and computes in the model's
    half-precision dtype, as a Mac does. ``identify`` hashes the weights for
    :attr:`LoadedModel.identity` (what stores are keyed by): a caller that stores nothing
    skips it (seconds for a large model).
    """
    name = name or DEFAULT_MODEL
    precision = checked_precision(precision) if precision else default_precision()
    source = _checked_source(name)
    with _hub_errors(name):
        model, tokenizer, config = _load(source, name, pipeline)
    if precision == "float32":
        model = to_float32(model)
    else:
        model = to_half(model, half_dtype(config))
    folder = Path(source) if Path(source).is_dir() else _hub_folder(source)
    probe = one_token_caches(model)
    return LoadedModel(model, tokenizer, name, model_shape(model, name, probe),
                       int(config.get("max_position_embeddings") or 0), precision,
                       model_identity(folder, precision, _part(pipeline)) if identify else "",
                       kv_bytes_per_token(model, probe))


def _load(source: str, name: str, pipeline: bool):
    """mlx-lm's model, tokenizer and config: all of it, or this rank's part of it."""
    import mlx_lm
    from mlx_lm.utils import sharded_load

    group = mx.distributed.init()
    if group.size() == 1:
        return mlx_lm.load(source, return_config=True)
    check_shardable(_config(source), name, group.size(), pipeline)
    return sharded_load(source, group if pipeline else None, None if pipeline else group, return_config=True)


def _part(pipeline: bool) -> str:
    """Which part of the model this process holds ("" for all of it)."""
    group = mx.distributed.init()
    if group.size() == 1:
        return ""
    return f"rank {group.rank()} of {group.size()}, split by {'layers' if pipeline else 'heads'}"


def _config(source: str) -> dict:
    folder = Path(source)
    return json.loads((folder / "config.json" if folder.is_dir() else _hub_config(source)).read_text())


def half_dtype(config: dict) -> mx.Dtype:
    """The model's half-precision dtype: its config's (``torch_dtype``) when that is
    float16 or bfloat16, else bfloat16 (float16 overflows some models' activations)."""
    named = config.get("torch_dtype") or config.get("dtype")
    return HALF_DTYPES.get(str(named), mx.bfloat16)


def to_half(model: nn.Module, dtype: mx.Dtype) -> nn.Module:
    """Keep the packed quantized weights; cast every float parameter to ``dtype``, the
    quantized layers' scales and biases included, since the quantized matmul computes
    (and so the activations and KV come) in their dtype."""
    model.set_dtype(dtype)
    mx.eval(model.parameters())
    return model


def _checked_source(name: str) -> str:
    """What to hand mlx_lm.load for `name`, after checking its architecture."""
    if name in BUILTIN_MODELS:
        folder = BUILTIN_MODELS[name]()
    elif Path(name).is_dir():
        folder = Path(name)
    else:
        check_config_file(_hub_config(name), name)
        return name
    check_config_file(folder / "config.json", name)
    return str(folder)


def _hub_config(repo_id: str) -> Path:
    with _hub_errors(repo_id):
        return Path(hf_hub_download(repo_id, "config.json"))


def _hub_folder(repo_id: str) -> Path:
    """The local snapshot mlx-lm just loaded ``repo_id`` from."""
    with _hub_errors(repo_id):
        return Path(snapshot_download(repo_id, local_files_only=True))


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


def to_float32(model: nn.Module) -> nn.Module:
    """Dequantize quantized layers (any mode MLX quantizes in) and cast to float32: the
    fast path on MLX's CPU."""
    # one CPU stream per core: dequantize is single-threaded, streams run side by side
    streams = [mx.new_stream(mx.cpu) for _ in range(os.cpu_count() or 1)]
    layers = []
    for path, module in model.named_modules():
        if isinstance(module, QUANTIZED):
            layers.append((path, _dequantized(module, streams[len(layers) % len(streams)])))
    if layers:
        model.update_modules(tree_unflatten(layers))
    _refuse_quantized_left(model)
    model.set_dtype(mx.float32)
    mx.eval(model.parameters())
    return model


def _dequantized(module: nn.Module, stream: mx.Stream) -> nn.Module:
    # affine: float32 scales make float32 weights directly, 2-3x faster on the CPU than
    # float16; the other modes (mxfp4, mxfp8, nvfp4) keep their packed scales
    mode = getattr(module, "mode", "affine")
    scales, biases = module.scales, module.get("biases")
    if mode == "affine":
        scales, biases = scales.astype(mx.float32), biases.astype(mx.float32)
    weight = mx.dequantize(module.weight, scales, biases, module.group_size, module.bits, mode,
                           global_scale=module.get("global_scale"), dtype=mx.float32, stream=stream)
    if isinstance(module, nn.QuantizedEmbedding):
        layer = nn.Embedding(*weight.shape)
    elif isinstance(module, nn.QuantizedAllToShardedLinear):  # this rank's rows of the weight
        layer = nn.AllToShardedLinear(weight.shape[1], weight.shape[0] * module.group.size(), "bias" in module,
                                      group=module.group)
    elif isinstance(module, nn.QuantizedShardedToAllLinear):  # this rank's columns
        layer = nn.ShardedToAllLinear(weight.shape[1] * module.group.size(), weight.shape[0], "bias" in module,
                                      group=module.group)
    else:
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in module)
    if "bias" in module:
        layer.bias = module.bias
    layer.weight = weight
    return layer


def _refuse_quantized_left(model: nn.Module) -> None:
    """One line for a quantized layer kind that cannot be dequantized here."""
    for path, module in model.named_modules():
        if "scales" in module and not isinstance(module, QUANTIZED):
            raise CKVError(f"cannot dequantize {path} ({type(module).__name__}) to float32; "
                           "load the model with --precision native")


def model_shape(model: nn.Module, name: str, probe: list | None = None) -> ModelShape:
    """The attention geometry of an mlx-lm model: its (text model's) query heads, and the
    KV heads and head size of the layers that compress, as one token read by mlx-lm
    shows them (``probe``: :func:`~ckv_mlx.model.families.one_token_caches`, made if not
    given); ``layers`` counts those layers (what a profile describes). A rank of a group
    describes the whole model, not its part."""
    args = text_model(model).args
    where = placement(model)
    keys = (probe or one_token_caches(model))[compressible_layers(model)[0]].keys  # the compressing layers' KV (Gemma 4's differ)
    return ModelShape(
        name=name,
        architecture=args.model_type,
        layers=where.total_layers,
        query_heads=args.num_attention_heads,
        kv_heads=keys.shape[1] * (where.tensor.size if where.tensor else 1),
        head_dim=keys.shape[3],
        compressed_layers=where.compressing,
        total_layers=where.model_layers,
    )
