"""Kept indices against the plain-NumPy reference of the method doc (tests/reference.py)."""


import mlx.core as mx
import numpy as np
import pytest

import reference as ref
from ckv_mlx.errors import CKVError
from ckv_mlx.policy.methods import CompressKV, CompressKVGQA, KeyDiff, PyramidKV, SnapKV, StreamingLLM, make_method
from ckv_mlx.engine.session import Session
from fakes import fake_profile
from reference_data import reference_file
from tiny import FAMILIES, TinyTokenizer, tiny_model



def random_layer(seed, q_heads=8, kv_heads=2, n=200, w=8, d=16):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(q_heads, w, d)).astype(np.float32) * 2
    k = rng.normal(size=(kv_heads, n, d)).astype(np.float32)
    return q, k


def ours(method, q, k, budget, layer=0):
    keep = method.keep_indices(layer, mx.array(q), mx.array(k), q.shape[-1] ** -0.5, budget)
    return np.array(keep)


class Profile1:
    """The one thing CompressKV asks of a profile here: a layer's SRHs."""

    layer_errors = None

    def __init__(self, heads):
        self.heads = heads

    def srh_heads(self, layer):
        return self.heads


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("pooling", ["avg", "max"])
def test_compresskv_matches_numpy(seed, pooling):
    q, k = random_layer(seed)
    srh = [5, 0, 7, 2]
    got = ours(CompressKV(Profile1(srh), pooling=pooling), q, k, 48)
    want = ref.select_compresskv(q, k, srh, 48, pooling=pooling)
    assert got.shape == (1, 48)
    np.testing.assert_array_equal(got[0], want)


@pytest.mark.parametrize("seed", range(5))
def test_compresskv_gqa_matches_numpy(seed):
    q, k = random_layer(seed, q_heads=12, kv_heads=4)
    srh = [1, 2, 9, 3]  # groups 0, 0, 3, 1: group 2 has none and falls back
    got = ours(CompressKVGQA(Profile1(srh)), q, k, 40)
    np.testing.assert_array_equal(got, ref.select_compresskv_gqa(q, k, srh, 40))


@pytest.mark.parametrize("seed", range(5))
def test_snapkv_matches_numpy_per_kv_head(seed):
    q, k = random_layer(seed)
    got = ours(SnapKV(), q, k, 32)
    np.testing.assert_array_equal(got, ref.select_snapkv(q, k, 32))


@pytest.mark.parametrize("seed", range(5))
def test_keydiff_matches_numpy_per_kv_head_whatever_the_queries(seed):
    q, k = random_layer(seed)
    got = ours(KeyDiff(), q, k, 32)
    np.testing.assert_array_equal(got, ref.select_keydiff(k, 32))
    np.testing.assert_array_equal(ours(KeyDiff(), -3 * q, k, 32), got)  # the question does not matter


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("chunk", [4, 7])
def test_chunked_snapkv_keeps_whole_chunks_as_numpy(seed, chunk):
    q, k = random_layer(seed)
    got = ours(make_method(f"snapkv+chunk{chunk}")[0], q, k, 40)
    grouped = ref.snapkv_grouped(q, k)
    want = np.stack([ref.select_chunked(s, 40, 8, chunk) for s in grouped])
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("seed", range(3))
def test_chunked_compresskv_is_one_token_set_of_whole_chunks(seed):
    q, k = random_layer(seed)
    srh = [5, 0, 7, 2]
    method = CompressKV(Profile1(srh))
    method.chunk = 5
    scores = ref._head_scores(q, k, srh, 8, 5, "avg").mean(axis=0)
    np.testing.assert_array_equal(ours(method, q, k, 48)[0], ref.select_chunked(scores, 48, 8, 5))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("span", [3, 6])
def test_spread_snapkv_keeps_the_tokens_after_its_best_as_numpy(seed, span):
    q, k = random_layer(seed)
    got = ours(make_method(f"snapkv+span{span}")[0], q, k, 40)
    want = np.stack([ref.select_spread(s, 40, 8, span) for s in ref.snapkv_grouped(q, k)])
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("reach", [2, 5])
def test_word_snapkv_keeps_whole_words_as_numpy(seed, reach):
    """``wordN``: each position scores as the best of its word within N either side."""
    q, k = random_layer(seed)
    words = np.cumsum(np.random.default_rng(seed).random(k.shape[1]) < 0.3)  # words of 1 to ~10 tokens
    method = make_method(f"snapkv+word{reach}")[0]
    got = np.array(method.keep_indices(0, mx.array(q), mx.array(k), q.shape[-1] ** -0.5, 40, words=mx.array(words)))
    want = np.stack([ref.select_word(s, 40, 8, words, reach) for s in ref.snapkv_grouped(q, k)])
    np.testing.assert_array_equal(got, want)
    assert not np.array_equal(got, ours(make_method("snapkv")[0], q, k, 40))  # it changes what is kept
    assert np.array_equal(ours(method, q, k, 40), ours(make_method("snapkv")[0], q, k, 40))  # no words: as snapkv


def test_method_options_set_window_pooling_and_kernel_under_one_name():
    method = make_method("snapkv+window16+max+kernel9+chunk8")[0]
    assert (method.name, method.window, method.pooling, method.kernel, method.chunk) == (
        "snapkv+chunk8+window16+kernel9+max", 16, "max", 9, 8)
    assert make_method("snapkv+max+kernel9")[0].name == make_method("snapkv+kernel9+max")[0].name
    assert make_method("snapkv")[0].chunk == 1


def test_a_fallback_is_named_for_the_method_that_runs():
    method, notes = make_method("compresskv-gqa+span8")
    assert isinstance(method, SnapKV) and method.name == "snapkv+span8" and method.span == 8 and notes


@pytest.mark.parametrize("name, words", [
    ("snapkv+chunk", "unknown option"), ("snapkv+kernel4", "must be odd"), ("snapkv+sum", "unknown option"),
    ("nokv+chunk8", "unknown method"), ("snapkv+chunk0", "unknown option"), ("full+span8", "takes no options"),
    ("streamingllm+chunk8", "takes no options"), ("keydiff+max", "pools nothing"), ("snapkv+span8+span4", "twice"),
])
def test_bad_method_options_are_refused_in_one_line(name, words):
    with pytest.raises(CKVError) as info:
        make_method(name)
    assert "\n" not in str(info.value) and words in str(info.value)


def test_streamingllm_matches_numpy():
    q, k = random_layer(0)
    np.testing.assert_array_equal(ours(StreamingLLM(), q, k, 32)[0], ref.select_streamingllm(200, 32))


def test_short_prompt_keeps_everything():
    q, k = random_layer(0, n=30)
    np.testing.assert_array_equal(ours(SnapKV(), q, k, 32)[0], np.arange(30))


def test_pyramid_budgets_are_the_reference_levelled_to_b_times_l():
    for layers, budget in [(32, 128), (30, 64), (24, 512)]:
        budgets, raw = PyramidKV().layer_budgets(budget, layers), ref.pyramid_budgets(layers, budget)
        assert sum(budgets) == layers * budget < sum(raw)
        assert all(0 <= r - b <= -(-(sum(raw) - layers * budget) // layers) for b, r in zip(budgets, raw))


def session_selection(model, method, prompt_len, budget, seed=0):
    """Prefill a random prompt; return (per-layer window queries, keys, kept indices)."""
    session = Session(model, TinyTokenizer(), method)
    mx.random.seed(seed)
    session.prefill(mx.random.randint(1, 128, (prompt_len,)).tolist())
    # the reference scales by 1/sqrt(head_dim); a layer attending with another scale (Gemma) has its queries rescaled
    inputs = [(np.array(a.window_queries) * a.scale * a.window_queries.shape[-1] ** 0.5, np.array(c.keys_and_values()[0][0]))
              for a, c in zip(session.attentions, session.caches)]
    kept = {}
    keep_indices = method.keep_indices
    method.keep_indices = lambda layer, *a: kept.setdefault(layer, keep_indices(layer, *a))
    budgets = session.compress(budget)
    return inputs, kept, budgets


@pytest.mark.parametrize("arch", FAMILIES)
@pytest.mark.parametrize("name", ["compresskv", "compresskv-gqa", "snapkv", "keydiff"])
def test_session_selects_like_numpy_on_a_tiny_model(name, arch):
    model = tiny_model(arch, layers=3, heads=6, kv_heads=2)
    profile = fake_profile(model)
    method, _ = make_method(name, profile)
    inputs, kept, budgets = session_selection(model, method, 150, 40)
    for layer, ((q, k), budget) in enumerate(zip(inputs, budgets)):
        heads = profile.srh_heads(layer)
        want = {
            "compresskv": lambda: ref.select_compresskv(q, k, heads, budget)[None],
            "compresskv-gqa": lambda: ref.select_compresskv_gqa(q, k, heads, budget),
            "snapkv": lambda: ref.select_snapkv(q, k, budget),
            "keydiff": lambda: ref.select_keydiff(k, budget),
        }[name]()
        np.testing.assert_array_equal(np.array(kept[layer]), want, err_msg=f"layer {layer}")


def test_llama_profile_runs_on_a_model_of_its_shape():
    from ckv_mlx.policy.budgets import error_aware
    from ckv_mlx.profiles import check_profile_matches
    from ckv_mlx.profiles.importer import import_head_idx, read_layer_score
    from fakes import tiny_shape

    name = "Llama-3.1-8B-Instruct"
    profile = import_head_idx(
        reference_file(f"scores/{name}_head_idx.json"), reference_file(f"scores/{name}_layer_score.jsonl")
    )
    model = tiny_model("llama", layers=32, heads=32, kv_heads=8, head_dim=4)
    assert check_profile_matches(profile, tiny_shape(model, name)) == [
        "profile was made for head_dim 128 but the model has 4"
    ]
    method, notes = make_method("compresskv", profile)
    assert notes == []
    inputs, kept, budgets = session_selection(model, method, 400, 64)
    errors = read_layer_score(reference_file(f"scores/{name}_layer_score.jsonl"), 32)
    assert budgets == error_aware(errors, 64)
    for layer, ((q, k), budget) in enumerate(zip(inputs, budgets)):
        heads = profile.srh[layer][:4]
        np.testing.assert_array_equal(
            np.array(kept[layer])[0], ref.select_compresskv(q, k, heads, budget), err_msg=f"layer {layer}"
        )
