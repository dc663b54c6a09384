"""The Python API: ``ckv_mlx.make_prompt_cache`` in mlx-lm's own generation loop.

Each compressed run is compared with our engine (``Session``: read, compress, generate, as
``python -m ckv_mlx.generate`` does) on the same model, and a run with nothing to evict
with plain mlx-lm, the independent reference.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import generate_step, stream_generate
from mlx_lm.models.cache import load_prompt_cache, make_prompt_cache, save_prompt_cache

import ckv_mlx
from ckv_mlx.errors import CKVError
from ckv_mlx.policy.methods import METHODS, make_method
from ckv_mlx.kv.prompt_cache import CompressingKVCache
from ckv_mlx.engine.session import Session
from fakes import fake_profile
from tiny import FAMILIES, TinyTokenizer, mac_model, plain_greedy, tiny_model

BUDGET = 32  # tokens per layer: a 160-token prompt is cut, and decode evicts every 8 tokens
STEPS = 32
COMPRESSING = [m for m in METHODS if METHODS[m].compresses] + ["compresskv-gqa+span8", "snapkv+chunk4"]


def prompt(n: int = 160, seed: int = 1) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(128) for _ in range(n)]


def engine_run(model, profile, name, tokens, kv_bits=None, budget=BUDGET, steps=STEPS):
    """Our engine's greedy tokens, its KV bytes after them, and each step's
    log-probabilities (the tokens fed in turn to a second session, as decoding feeds them)."""
    method, _ = make_method(name, profile)
    runs = [Session(model, TinyTokenizer(), method, kv_bits=kv_bits) for _ in range(2)]
    logits = [run.prefill(tokens) for run in runs]
    for run in runs:
        run.compress(budget)
    out = list(runs[0].generate(logits[0], steps))
    return out, runs[0].kv_bytes, forced_logprobs(runs[1], logits[1], out)


def forced_logprobs(session, logits, tokens) -> np.ndarray:
    """Each step's log-probabilities through ``session``, ``tokens`` fed in turn after
    ``logits``, normalised in the model's dtype as mlx-lm's generate_step does."""
    rows = [logits]
    for token in tokens[:-1]:
        session.make_room(1)
        rows.append(session.model(mx.array([[token]]), cache=session.model_caches())[:, -1, :])
    return np.array(mx.concatenate([r - mx.logsumexp(r, axis=-1, keepdims=True) for r in rows]).astype(mx.float32))


def mlx_lm_run(model, cache, tokens, steps=STEPS, step=512):
    """mlx-lm's generate_step with ``cache``: greedy tokens, the cache's KV bytes after
    them, and each step's log-probabilities."""
    steps = list(generate_step(mx.array(tokens), model, max_tokens=steps, prompt_cache=cache, prefill_step_size=step))
    logprobs = np.array(mx.stack([lp for _, lp in steps]).astype(mx.float32))
    return [t for t, _ in steps], sum(c.nbytes for c in cache), logprobs


def assert_same_run(ours, theirs, atol=1e-4):
    assert ours[:2] == theirs[:2]  # tokens and bytes
    np.testing.assert_allclose(theirs[2], ours[2], atol=atol)


def kv(bits):
    from ckv_mlx.kv.quantized import KVBits

    return KVBits(bits) if bits else None


@pytest.mark.parametrize("arch", FAMILIES)
@pytest.mark.parametrize("name", COMPRESSING)
def test_mlx_lm_generation_with_our_cache_equals_our_engine(arch, name):
    model = tiny_model(arch, layers=4)
    profile = fake_profile(model)
    tokens = prompt()
    expected = engine_run(model, profile, name, tokens)
    cache = ckv_mlx.make_prompt_cache(model, name, BUDGET, profile, kv_bits=16)
    assert_same_run(expected, mlx_lm_run(model, cache, tokens))
    assert any(isinstance(c, CompressingKVCache) and c.compressed for c in cache)


@pytest.mark.parametrize("arch,name,dtype", [
    ("llama", "compresskv", "bfloat16"), ("llama", "compresskv-gqa+span8", "float16"),
    ("qwen3", "snapkv-ada", "bfloat16"), ("gemma3_text", "compresskv-gqa+span8", "bfloat16"),
    ("gpt_oss", "compresskv-gqa", "bfloat16"), ("qwen3_next", "pyramidkv", "float16"),
])
def test_as_on_a_mac_half_precision_and_4_bit_weights_with_8_bit_rows(arch, name, dtype):
    model = mac_model(arch, dtype, layers=4, head_dim=32)  # rows pack in groups of 32
    profile = fake_profile(model)
    tokens = prompt()
    expected = engine_run(model, profile, name, tokens, kv_bits=kv(8))
    cache = ckv_mlx.make_prompt_cache(model, name, BUDGET, profile)  # the default: 8-bit rows, as generate
    assert_same_run(expected, mlx_lm_run(model, cache, tokens), atol=1e-2)


def test_the_prefill_step_does_not_change_the_answer():
    model = tiny_model("llama", layers=4)
    profile = fake_profile(model)
    tokens = prompt(300)
    expected = engine_run(model, profile, "compresskv-gqa", tokens)
    for step in (1, 2, 37, 2048):
        cache = ckv_mlx.make_prompt_cache(model, "compresskv-gqa", BUDGET, profile, kv_bits=16)
        assert_same_run(expected, mlx_lm_run(model, cache, tokens, step=step))


def test_compression_changes_the_log_probabilities_so_the_comparisons_can_fail():
    model = tiny_model("llama", layers=4)
    profile, tokens = fake_profile(model), prompt()
    expected = engine_run(model, profile, "compresskv", tokens)
    other = mlx_lm_run(model, ckv_mlx.make_prompt_cache(model, "snapkv", BUDGET, profile, kv_bits=16), tokens)
    plain = mlx_lm_run(model, ckv_mlx.make_prompt_cache(model, "full"), tokens)
    for run in (other, plain):
        assert np.abs(run[2] - expected[2]).max() > 1e-2


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "qwen3_5"])
@pytest.mark.parametrize("name", COMPRESSING)
def test_with_nothing_to_evict_it_is_plain_mlx_lm(arch, name):
    model = tiny_model(arch, layers=4)
    tokens = prompt(40)
    cache = ckv_mlx.make_prompt_cache(model, name, 256, fake_profile(model), kv_bits=16, region=STEPS)  # room for all
    plain = mlx_lm_run(model, make_prompt_cache(model), tokens)
    np.testing.assert_allclose(mlx_lm_run(model, cache, tokens)[2], plain[2], atol=1e-4)
    assert plain[0] == plain_greedy(model, tokens, STEPS)


def test_stream_generate_takes_it_with_a_tokenizer(default_model):
    loaded = default_model
    text = "The vault code is 4172. " + "The sky was grey and the sea was calm. " * 60
    messages = [{"role": "user", "content": f"{text}\n\nWhat is the vault code?"}]
    tokens = loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    method, _ = make_method(ckv_mlx.CACHE_METHOD, _shipped(loaded))
    session = Session(loaded.model, loaded.tokenizer, method, kv_bits=kv(8))
    logits = session.prefill(tokens)
    session.compress(64)
    expected = list(session.generate(logits, 12))
    cache = ckv_mlx.make_prompt_cache(loaded.model, budget=64)
    out = [r.token for r in stream_generate(loaded.model, loaded.tokenizer, tokens, max_tokens=12,
                                            prompt_cache=cache, prefill_step_size=512)]
    assert out[: len(expected)] == expected and len(out) - len(expected) <= 1  # mlx-lm also yields the EOS


def _shipped(loaded):
    from ckv_mlx.profiles import resolve_profile

    return resolve_profile(None, loaded.shape)[0]


@pytest.mark.parametrize("arch,bits", [("llama", None), ("llama", 8), ("gemma3_text", None), ("qwen3_5", 8),
                                       ("llama", 4)])
def test_save_and_load_with_mlx_lm_then_decoding_goes_on_token_for_token(tmp_path, arch, bits):
    model = tiny_model(arch, layers=4, head_dim=32)  # rows pack in groups of 32
    profile = fake_profile(model)
    tokens = prompt()
    whole, _, whole_logprobs = mlx_lm_run(
        model, ckv_mlx.make_prompt_cache(model, "compresskv", BUDGET, profile, kv_bits=bits or 16), tokens,
        steps=2 * STEPS)
    cache = ckv_mlx.make_prompt_cache(model, "compresskv", BUDGET, profile, kv_bits=bits or 16)
    first = mlx_lm_run(model, cache, tokens)[0]
    save_prompt_cache(str(tmp_path / "c.safetensors"), cache, {"note": "ours"})
    loaded, meta = load_prompt_cache(str(tmp_path / "c.safetensors"), return_metadata=True)
    assert meta == {"note": "ours"}
    assert [type(c) for c in loaded] == [type(c) for c in cache]
    # mlx-lm fed every yielded token; the next one, whole[STEPS], continues the answer
    rest, _, rest_logprobs = mlx_lm_run(model, loaded, [whole[STEPS]], steps=STEPS - 1)
    assert first + [whole[STEPS]] + rest == whole
    np.testing.assert_allclose(rest_logprobs, whole_logprobs[STEPS + 1 :], atol=1e-4)


def test_a_saved_cache_carries_its_method_budgets_and_srhs(tmp_path):
    model = tiny_model("llama", layers=4, head_dim=32)
    profile = fake_profile(model)
    cache = ckv_mlx.make_prompt_cache(model, "compresskv-gqa+span8", 64, profile)
    mlx_lm_run(model, cache, prompt(), steps=2)
    save_prompt_cache(str(tmp_path / "c.safetensors"), cache)
    loaded = load_prompt_cache(str(tmp_path / "c.safetensors"))
    expected_budgets = make_method("compresskv-gqa", profile)[0].layer_budgets(64, 4)
    assert [c.policy.budget for c in loaded] == expected_budgets
    assert [c.policy.srh_heads for c in loaded] == [profile.srh_heads(layer) for layer in range(4)]
    assert {(c.policy.method, c.policy.profile) for c in loaded} == {("compresskv-gqa+span8", "tiny")}
    assert {c.kv_bits.bits for c in loaded} == {8}


def test_compress_selects_a_prompt_read_by_the_caller():
    model = tiny_model("llama", layers=4)
    profile = fake_profile(model)
    tokens = prompt()
    expected = engine_run(model, profile, "compresskv", tokens)
    cache = ckv_mlx.make_prompt_cache(model, "compresskv", 200, profile, kv_bits=16)
    logits = model(mx.array([tokens]), cache=cache)[:, -1]
    ckv_mlx.compress(cache, BUDGET)
    out, token = [], mx.argmax(logits, axis=-1)
    for _ in range(STEPS):
        out.append(token.item())
        token = mx.argmax(model(token.reshape(1, 1), cache=cache)[:, -1], axis=-1)
    assert (out, sum(c.nbytes for c in cache)) == expected[:2]


@pytest.mark.parametrize("kwargs,message", [
    ({"method": "fastkv"}, "unknown method 'fastkv'"),
    ({"budget": 8}, "budget 8 is too small"),
    ({"method": "snapkv+kernel4"}, "the pooling kernel must be odd"),
    ({"region": 0}, "region must be at least 1"),
    ({"kv_bits": 5}, "5"),
])
def test_bad_arguments_raise_the_clis_one_line(kwargs, message):
    model = tiny_model("llama", layers=2)
    with pytest.raises(CKVError, match=message) as error:
        ckv_mlx.make_prompt_cache(model, **kwargs)
    assert "\n" not in str(error.value)


def test_a_profile_for_another_model_is_refused():
    other = fake_profile(tiny_model("llama", layers=3), name="other")
    with pytest.raises(CKVError, match="does not fit model"):
        ckv_mlx.make_prompt_cache(tiny_model("llama", layers=2), profile=other)


def test_a_family_we_do_not_compress_is_refused():
    class Unsupported:
        model_type = "mamba"

    with pytest.raises(CKVError, match="'mamba'.*not supported"):
        ckv_mlx.make_prompt_cache(Unsupported())


def test_a_cache_used_with_another_model_is_refused():
    cache = ckv_mlx.make_prompt_cache(tiny_model("llama", layers=2, kv_heads=2), "snapkv", 32)
    other = tiny_model("llama", layers=2, kv_heads=1)
    with pytest.raises(CKVError, match="made for 2 KV heads"):
        other(mx.array([prompt(10)]), cache=cache)


def readme_example() -> str:
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme[readme.index("## Use it from Python"):]
    return section[section.index("```python\n") + len("```python\n"):section.index("```\n", section.index("```python"))]


def test_the_readmes_example_answers_as_generate_does(default_model, capsys, monkeypatch):
    from ckv_mlx.generate import main

    monkeypatch.chdir(Path(__file__).parents[1])
    exec(compile(readme_example(), "README.md", "exec"), {})
    example = capsys.readouterr().out
    assert main(["--doc", "samples/report.txt", "--prompt", "Who is the CFO?", "--max-tokens", "48", "--no-store",
                 "--method", ckv_mlx.CACHE_METHOD, "--json"]) == 0
    report = json.loads(capsys.readouterr().out.splitlines()[-1])
    *answer, kv_line = example.rstrip("\n").split("\n")
    assert report["text"].strip() and "\n".join(answer).strip() == report["text"].strip()
    assert kv_line == f"KV cache: {report['kv_bytes_kept'] / 2**20:.2f} MiB allocated"
