"""The Mac path on this CPU: 4-bit weights kept quantized, bfloat16/float16 activations
and KV. Every reference is plain mlx-lm (or NumPy) on the same quantized model, same dtype."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_lm.models.cache import load_prompt_cache, save_prompt_cache
from ckv_mlx.eval.harness import Harness, Setting
from ckv_mlx.eval.tasks import EvalSample
from ckv_mlx.policy.methods import METHODS, make_method
from ckv_mlx.profile.layers import layer_trial
from ckv_mlx.profile.srh import head_scores
from ckv_mlx.engine.session import Session
from ckv_mlx.profile.taps import SpanRecorder, tapped
from fakes import fake_profile
from tiny import FAMILIES, HALF, TinyTokenizer, mac_model, masked_plain_logits, plain_greedy, plain_logits, session_logits

DTYPES = list(HALF)
ATOL = {"bfloat16": 0.1, "float16": 0.02}  # logits of order 1: a few ulps of the dtype


def tokens(n, seed=1):
    mx.random.seed(seed)
    return mx.random.randint(1, 128, (n,)).tolist()


class WordTokenizer(TinyTokenizer):
    """Decodes ids to numbers: never a newline, so answers run to max_tokens."""

    def decode(self, ids):
        return " ".join(map(str, ids))


def close(a, b, dtype):
    assert a.dtype == b.dtype == HALF[dtype]
    return mx.allclose(a.astype(mx.float32), b.astype(mx.float32), atol=ATOL[dtype]).item()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("arch", FAMILIES)
@pytest.mark.parametrize("name", list(METHODS))
def test_nothing_to_evict_matches_plain_mlx_lm(name, arch, dtype):
    prompt, forced = tokens(48), tokens(10, seed=2)
    model = mac_model(arch, dtype)
    reference = plain_logits(model, prompt, forced)
    session = Session(model, TinyTokenizer(), make_method(name, fake_profile(model))[0], region=len(forced))
    ours = session_logits(session, prompt, forced)
    assert session.caches[0].keys.dtype == HALF[dtype]
    for step, (a, b) in enumerate(zip(reference, ours)):
        assert close(a, b, dtype), f"step {step}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["compresskv", "compresskv-gqa", "snapkv", "pyramidkv", "streamingllm",
                                  "compresskv-gqa+span8", "snapkv+chunk20"])
def test_compressed_decode_matches_masked_mlx_lm(name, dtype):
    prompt, forced = tokens(96), tokens(8, seed=9)
    model = mac_model("llama", dtype, layers=3)
    method, _ = make_method(name, fake_profile(model))
    kept, keep_indices = {}, method.keep_indices
    method.keep_indices = lambda layer, *a: kept.setdefault(layer, keep_indices(layer, *a))
    session = Session(model, TinyTokenizer(), method, region=16)
    session.prefill(prompt)
    session.compress(40)
    ours = []
    for token in forced:
        session.make_room(1)
        ours.append(model(mx.array([[token]]), cache=session.model_caches())[:, -1])
    for step, (a, b) in enumerate(zip(masked_plain_logits(model, prompt, forced, kept), ours)):
        assert close(a, b, dtype), f"step {step}"


@pytest.mark.parametrize("dtype", DTYPES)
def test_greedy_generation_matches_mlx_lm(dtype):
    model, prompt = mac_model("llama", dtype), tokens(60)
    session = Session(model, TinyTokenizer(), make_method("full")[0])
    assert list(session.generate(session.prefill(prompt), 16)) == plain_greedy(model, prompt, 16)


@pytest.mark.parametrize("dtype", DTYPES)
def test_saved_cache_resumes_identically(dtype, tmp_path):
    model = mac_model("llama", dtype)
    session = Session(model, TinyTokenizer(), make_method("snapkv")[0])
    session.prefill(tokens(80))
    session.compress(32)
    save_prompt_cache(str(tmp_path / "s.safetensors"), session.caches)  # mlx-lm's own file
    caches = load_prompt_cache(str(tmp_path / "s.safetensors"))
    assert caches[0].keys.dtype == HALF[dtype]
    token = mx.array([[5]])
    assert mx.array_equal(model(token, cache=caches), model(token, cache=session.model_caches()))


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_errors_are_float32_and_finite(dtype):
    """Reproduces `profile layers` on half models: bf16 could not become NumPy, fp16 gave NaN."""
    model = mac_model("llama", dtype, layers=3)
    session = Session(model, WordTokenizer(), make_method("full")[0])
    method, _ = make_method("compresskv", fake_profile(model))
    record = layer_trial(session, WordTokenizer(), tokens(120), method, 32, 6, "sum")
    errors = np.array(record["errors"])
    assert record["steps"] == 6 and errors.shape == (3,)
    assert np.isfinite(errors).all() and (errors > 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_srh_span_mass_is_float32_and_matches_numpy(dtype):
    model, prompt, span = mac_model("llama", dtype), tokens(80), range(20, 30)
    session = Session(model, TinyTokenizer(), make_method("full")[0])
    session.feed(prompt[:-1])
    recorders = [SpanRecorder(span) for _ in session.attentions]
    with tapped(session.attentions, recorders):
        logits = session.feed(prompt[-1:])  # the first recorded step: the last prompt token
        last_queries = [np.array(a.window_queries[:, -1].astype(mx.float32)) for a in session.attentions]
        generated = list(session.generate(logits, 3))
    for recorder, attention, cache, query in zip(recorders, session.attentions, session.caches, last_queries):
        keys = np.array(cache.keys_and_values()[0][0, :, :80].astype(mx.float32))  # [kv_heads, 80, d]
        group = query.shape[0] // keys.shape[0]
        logit = np.einsum("hd,hnd->hn", query, np.repeat(keys, group, axis=0)) * attention.scale
        probs = np.exp(logit - logit.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        assert recorder.mass[0].dtype == mx.float32
        np.testing.assert_allclose(np.array(recorder.mass[0]), probs[:, 20:30].sum(-1), atol=1e-5)
    srh, retrieval = head_scores(recorders, prompt, span, generated)
    assert srh.shape == retrieval.shape == (2, 4) and np.isfinite(srh).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_eval_harness_runs_and_its_full_answer_is_mlx_lms(dtype):
    model = mac_model("llama", dtype)
    document, question = tokens(150), tokens(6, seed=4)
    sample = EvalSample("s0", "niah", 150, document, [question], [lambda text: {"score": 1.0}])
    session = Session(model, WordTokenizer(), make_method("full")[0])
    settings = [Setting(make_method("full")[0], None), Setting(make_method("snapkv")[0], "32")]
    records = list(Harness(session, WordTokenizer(), max_tokens=6).run(sample, settings, ["query-aware"], set()))
    full, snap = records
    assert full["answer"] == WordTokenizer().decode(plain_greedy(model, document + question, 6))
    assert 0 < snap["kv_fraction"] < 1 and 0 <= snap["top1"] <= 1 and np.isfinite(snap["kl"])


@pytest.mark.slow
def test_builtin_model_quantized_in_bfloat16_end_to_end():
    """The built-in model as a Mac loads it (4-bit weights, bfloat16): prefill, compress,
    generate. Kept whole, it says what plain mlx-lm says; compressed, it still reads the key."""
    from mlx_lm import generate

    from ckv_mlx.errors import CKVError
    from ckv_mlx.model.models import load_model
    from ckv_mlx.profiles import resolve_profile

    try:
        loaded = load_model(precision="native")
    except CKVError as e:
        pytest.skip(f"built-in model unavailable: {e}")
    assert loaded.model.model.norm.weight.dtype == mx.bfloat16
    assert type(loaded.model.layers[0].self_attn.q_proj).__name__ == "QuantizedLinear"
    filler = "The grass is green. The sky is blue. "
    ids = loaded.tokenizer.encode(filler * 2 + "The pass key is 71432. " + filler * 2 + "\nWhat is the pass key? The pass key is")
    expected = generate(loaded.model, loaded.tokenizer, prompt=ids, max_tokens=6)

    profile, _, _ = resolve_profile(None, loaded.shape)
    session = Session(loaded.model, loaded.tokenizer, make_method("compresskv", profile)[0])
    logits = session.prefill(ids)
    document = session.snapshot()
    answers = {}
    for budget in (len(ids), 48):
        session.restore(document)
        session.compress(budget)
        answers[budget] = loaded.tokenizer.decode(list(session.generate(logits, 6)))
    assert session.caches[0].keys.dtype == mx.bfloat16 and len(ids) > 48
    assert answers[len(ids)].strip() == expected.strip()
    assert "7143" in answers[48]  # measured: " 71432" at 48 of 63 tokens, " 7143." at 32 and 40
