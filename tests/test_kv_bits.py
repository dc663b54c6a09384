"""Kept rows stored quantized (``--kv-bits``): the attention against a NumPy spec of
affine dequantization, the session against plain mlx-lm with the rows quantized as its
``QuantizedKVCache`` quantizes them, exact bytes, bit-for-bit re-scores and resumes."""

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import QuantizedKVCache, make_prompt_cache

from ckv_mlx.chat import session_file
from ckv_mlx.chat.session_file import SavedSession
from ckv_mlx.kv.cache import EvictingKVCache
from ckv_mlx.errors import CKVError
from ckv_mlx.policy.methods import make_method
from ckv_mlx.kv.quantized import KVBits, QuantizedRows, attention, kv_bits_setting
from ckv_mlx.engine.session import Session
from fakes import fake_profile
from tiny import (
    FAMILIES, HALF, TinyTokenizer, mac_model, masked_plain_logits, quantized_plain_logits, tiny_model,
)

GROUP = 32  # the tiny models' heads are 32 wide


def tokens(n, seed=1):
    mx.random.seed(seed)
    return mx.random.randint(1, 128, (n,)).tolist()


def numpy_dequantized(packed, bits: int, group_size: int) -> np.ndarray:
    """The affine spec: each uint32 holds 32 / bits values, lowest bits first; a value
    is ``q * scale + bias``, one scale and bias per ``group_size`` values."""
    words, scales, biases = (np.array(x.astype(mx.float32) if x.dtype != mx.uint32 else x) for x in packed)
    per_word = 32 // bits
    shifts = np.arange(per_word, dtype=np.uint32) * bits
    q = ((words[..., None] >> shifts) & (2**bits - 1)).reshape(*words.shape[:-1], -1).astype(np.float64)
    groups = q.reshape(*q.shape[:-1], -1, group_size)
    return (groups * scales[..., None] + biases[..., None]).reshape(q.shape)


def numpy_attention(q, k, v, scale, causal, sinks):
    """Softmax attention in float64, GQA by repeating KV heads, sinks in the softmax."""
    heads, kv_heads = q.shape[1], k.shape[1]
    k, v = (np.repeat(x, heads // kv_heads, axis=1) for x in (k, v))
    scores = (q * scale) @ k.swapaxes(-1, -2)
    if causal:
        length, rows = scores.shape[-2:]
        scores = np.where(np.arange(rows - length, rows)[:, None] >= np.arange(rows)[None], scores, -np.inf)
    top = scores.max(axis=-1, keepdims=True)
    if sinks is not None:
        top = np.maximum(top, sinks[None, :, None, None])
    weights = np.exp(scores - top)
    total = weights.sum(axis=-1, keepdims=True)
    if sinks is not None:
        total += np.exp(sinks[None, :, None, None] - top)
    return (weights / total) @ v


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [1, 2])
@pytest.mark.parametrize("length", [1, 3])
@pytest.mark.parametrize("with_sinks", [False, True])
def test_attention_over_packed_and_full_rows_is_the_spec(bits, group, length, with_sinks):
    mx.random.seed(0)
    kv_heads, dim, packed_rows, rest_rows = 2, 64, 40, 5
    queries = mx.random.normal((1, kv_heads * group, length, dim))
    kept_k, kept_v, rest_k, rest_v = (mx.random.normal((1, kv_heads, n, dim)) for n in (packed_rows, packed_rows,
                                                                                         rest_rows, rest_rows))
    kv_bits = KVBits(bits, GROUP)
    keys = QuantizedRows(kv_bits.pack(kept_k), rest_k, kv_bits)
    values = QuantizedRows(kv_bits.pack(kept_v), rest_v, kv_bits)
    sinks = mx.linspace(1, 4, kv_heads * group) if with_sinks else None
    ours = attention(queries, keys, values, 0.125, "causal" if length > 1 else None, sinks)
    k = np.concatenate([numpy_dequantized(keys.packed, bits, GROUP), np.array(rest_k)], axis=2)
    v = np.concatenate([numpy_dequantized(values.packed, bits, GROUP), np.array(rest_v)], axis=2)
    spec = numpy_attention(np.array(queries), k, v, 0.125, length > 1, None if sinks is None else np.array(sinks))
    np.testing.assert_allclose(np.array(ours), spec, atol=2e-5, rtol=1e-4)
    assert keys.shape == (1, kv_heads, packed_rows + rest_rows, dim)


def session_for(model, name="snapkv", bits=8, region=16):
    method, _ = make_method(name, fake_profile(model))
    return Session(model, TinyTokenizer(), method, region=region, kv_bits=KVBits(bits, GROUP) if bits else None)


def spied(session) -> dict:
    """The rows each layer keeps, as the method chooses them."""
    kept, keep_indices = {}, session.method.keep_indices
    session.method.keep_indices = lambda layer, *a: kept.setdefault(layer, keep_indices(layer, *a))
    return kept


CLOSE = {"float32": 1e-4, "bfloat16": 6e-2, "float16": 1e-2}


def model_in(dtype, arch="llama", layers=3):
    if dtype == "float32":
        return tiny_model(arch, layers=layers, head_dim=32)
    return mac_model(arch, dtype, layers=layers, head_dim=32)


@pytest.mark.parametrize("dtype", ["float32", *HALF])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("name", ["compresskv", "compresskv-gqa", "snapkv", "streamingllm"])
def test_compressed_decode_matches_masked_mlx_lm_with_its_quantized_rows(name, bits, dtype):
    prompt, forced = tokens(96), tokens(12, seed=9)  # fewer than the region: no re-score
    model = model_in(dtype)
    session = session_for(model, name, bits)
    kept = spied(session)
    session.prefill(prompt)
    session.compress(40)
    assert all(c.packed_rows == c.length for c in session.caches)
    ours = []
    for token in forced:
        session.make_room(1)
        ours.append(model(mx.array([[token]]), cache=session.model_caches())[:, -1])
    reference = masked_plain_logits(model, prompt, forced, kept, (bits, GROUP))
    unquantized = masked_plain_logits(model, prompt, forced, kept)
    for step, (a, b, c) in enumerate(zip(reference, ours, unquantized)):
        a, b, c = (np.array(x.astype(mx.float32)) for x in (a, b, c))
        np.testing.assert_allclose(b, a, atol=CLOSE[dtype] * max(1, np.abs(a).max()), err_msg=f"step {step}")
    if dtype == "float32":  # the quantization is there: the unquantized logits are further off
        assert np.abs(b - c).max() > 10 * np.abs(b - a).max()


@pytest.mark.parametrize("arch", FAMILIES)
def test_nothing_to_evict_matches_mlx_lm_with_its_quantized_rows_in_every_family(arch):
    prompt, forced = tokens(48), tokens(12, seed=2)
    reference = quantized_plain_logits(tiny_model(arch, layers=4, head_dim=32), prompt, forced, 4, GROUP)
    session = session_for(tiny_model(arch, layers=4, head_dim=32), bits=4, region=len(forced))
    out = [session.prefill(prompt)]
    session.compress(len(prompt))
    assert all(c.packed_rows == len(prompt) for c in session.caches)
    for token in forced:
        session.make_room(1)
        out.append(session.model(mx.array([[token]]), cache=session.model_caches())[:, -1])
    for step, (a, b) in enumerate(zip(reference, out)):
        np.testing.assert_allclose(np.array(b), np.array(a), atol=1e-4, rtol=1e-4, err_msg=f"{arch} step {step}")


@pytest.mark.parametrize("bits", [4, 8])
def test_logits_are_mlx_lm_quantized_kv_caches_up_to_the_quantization_of_the_new_rows(bits):
    """Against mlx-lm's own ``QuantizedKVCache`` over the same (all kept) rows: it reads
    the prompt quantized and packs new tokens at once, we read it in full precision and
    pack at the next re-score, so the two differ by about what the quantization itself
    moves the logits, and ours stay closer to the full cache's."""
    prompt, forced = tokens(64), tokens(10, seed=3)
    model = tiny_model("llama", layers=3, head_dim=32)
    theirs = [QuantizedKVCache(GROUP, bits) for _ in model.layers]
    plain = make_prompt_cache(model)
    steps = [(model(mx.array([prompt]), cache=theirs)[:, -1], model(mx.array([prompt]), cache=plain)[:, -1])]
    steps += [(model(mx.array([[t]]), cache=theirs)[:, -1], model(mx.array([[t]]), cache=plain)[:, -1]) for t in forced]
    session = session_for(model, bits=bits, region=16)
    session.prefill(prompt)
    session.compress(len(prompt))
    ours = []
    for token in forced:
        session.make_room(1)
        ours.append(model(mx.array([[token]]), cache=session.model_caches())[:, -1])
    for step, (b, (q, full)) in enumerate(zip(ours, steps[1:])):
        b, q, full = (np.array(x) for x in (b, q, full))
        quantization = np.abs(q - full).max()
        assert np.abs(b - q).max() <= 1.5 * quantization, f"step {step}"
        assert np.abs(b - full).max() < quantization, f"step {step}"  # the prefill in full precision loses less


def test_rows_kept_again_at_a_re_score_stay_bit_for_bit():
    kv_bits = KVBits(4, GROUP)
    mx.random.seed(5)
    keys, values = mx.random.normal((1, 2, 30, 32)), mx.random.normal((1, 2, 30, 32))
    cache = EvictingKVCache(region=8)
    cache.update_and_fetch(keys, values)
    first = mx.array([[0, 3, 7, 11, 20, 29]] * 2)
    cache.compress(first, 6, kv_bits)
    packed_before = [np.array(x) for x in cache.packed[0]]
    new_k, new_v = mx.random.normal((1, 2, 4, 32)), mx.random.normal((1, 2, 4, 32))
    cache.update_and_fetch(new_k, new_v)
    assert cache.length == 10 and cache.packed_rows == 6 and cache.kv_bits == kv_bits
    again = mx.array([[1, 2, 5, 6, 8, 9], [0, 1, 2, 3, 4, 7]])  # per KV head: old rows 1, 2, 5 and new 6, 8, 9 ...
    cache.compress(again, 6)  # packed as it was before
    for head in range(2):
        for slot, row in enumerate(np.array(again[head])):
            for ours, before, new in zip(cache.packed[0], packed_before, kv_bits.pack(new_k)):
                expected = before[0, head, row] if row < 6 else np.array(new)[0, head, row - 6]
                assert np.array_equal(np.array(ours)[0, head, slot], expected)
    np.testing.assert_allclose(np.array(cache.keys_and_values()[0][0, 0, 3]), np.array(new_k[0, 0, 0]), atol=0.3)  # row 6


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", ["float32", *HALF])
def test_bytes_are_the_packed_rows_scales_biases_and_the_region_exactly(bits, dtype):
    model = model_in(dtype, layers=2)
    session = session_for(model, bits=bits, region=16)
    session.prefill(tokens(300))
    mx.synchronize()
    before = mx.get_active_memory()
    full = session.kv_bytes
    session.compress(64)
    mx.synchronize()
    width = {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]
    kv_heads, dim, layers = 2, 32, 2
    packed_row = kv_heads * (dim * bits // 8 + 2 * (dim // GROUP) * width)  # keys or values, one token
    formula = layers * (64 * 2 * packed_row + 16 * 2 * kv_heads * dim * width)
    assert session.kv_bytes == formula
    assert abs((mx.get_active_memory() - before) - (session.kv_bytes - full)) <= 64 * 2**10
    assert session.kv_rows_bytes == formula - layers * 16 * 2 * kv_heads * dim * width  # the region is empty


def test_a_long_decode_re_scores_within_its_bounds_and_keeps_everything_but_the_region_packed():
    session = session_for(tiny_model("llama", layers=2, head_dim=32), "compresskv", bits=4, region=8)
    logits = session.prefill(tokens(200))
    session.compress(40)
    for _ in session.generate(logits, 60):
        for cache in session.caches:
            assert cache.length <= cache.budget + cache.region and cache.capacity <= cache.budget + cache.region
            assert cache.length - cache.packed_rows <= cache.region
    assert session.stats.generated_tokens == 60


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_saved_quantized_cache_continues_token_for_token(dtype, tmp_path):
    """The combination that corrupted retrieval elsewhere: quantized rows, saved, resumed."""
    def session():
        return session_for(model_in(dtype, layers=2), "snapkv", bits=4, region=8)

    first = session()
    logits = first.prefill(tokens(120))
    first.compress(32)
    head = list(first.generate(logits, 5))  # past the region's first re-score, with rows in full precision left
    session_file.write(tmp_path / "s.ckv", SavedSession({}, first.caches, first.remembered_queries(), {}))
    expected = list(first.generate(first.model(mx.array([[head[-1]]]), cache=first.model_caches())[:, -1], 12))
    saved = session_file.read(tmp_path / "s.ckv")
    caches = saved.caches
    assert all(c.kv_bits == KVBits(4, GROUP) and c.packed is not None for c in caches)
    again = session()
    again.take_over(caches, saved.window_queries)
    got = list(again.generate(again.model(mx.array([[head[-1]]]), cache=again.model_caches())[:, -1], 12))
    assert got == expected


def test_a_bounded_read_stays_in_full_precision_and_the_first_compression_packs():
    session = session_for(tiny_model("llama", layers=2, head_dim=32), bits=8)
    session.prefill(tokens(300), working_budget=64, chunk=64)
    assert all(c.packed is None and c.compressed for c in session.caches)
    session.compress(48)
    assert all(c.packed_rows == 48 for c in session.caches)


@pytest.mark.parametrize("bits, group_size, words", [(3, 64, "--kv-bits 3"), (4, 48, "--kv-group-size 48")])
def test_unsupported_bits_or_groups_are_one_line(bits, group_size, words):
    with pytest.raises(CKVError, match=words):
        KVBits(bits, group_size)


@pytest.mark.parametrize("kv_bits, words", [(KVBits(8, 32), "head size 16 is not a multiple of --kv-group-size 32"),
                                             (KVBits(4), "head size 16 is not a multiple of 32, the smallest group")])
def test_a_head_size_the_groups_do_not_divide_is_one_line_before_anything_is_read(kv_bits, words):
    model = tiny_model("llama", layers=2, head_dim=16)
    with pytest.raises(CKVError, match=words):
        Session(model, TinyTokenizer(), make_method("snapkv")[0], kv_bits=kv_bits)
    session = Session(model, TinyTokenizer(), make_method("snapkv")[0])
    with pytest.raises(CKVError, match=words):
        session.kv_bits = kv_bits  # as the chat, the server and the eval set it
    assert session.kv_bits is None


def test_the_default_is_8_bits_for_a_compressing_method_and_as_computed_where_it_cannot_pack():
    """Not asked for, the kept rows are 8-bit; a head size no group divides keeps
    them as computed instead of refusing the run."""
    default = kv_bits_setting(None, None)
    assert default == KVBits(8) and default.implied
    assert kv_bits_setting(None, None, compresses=False) is None  # full keeps every row as computed
    assert kv_bits_setting(16, None) is None and kv_bits_setting(16, None, compresses=False) is None
    assert kv_bits_setting(None, 32) == KVBits(8, 32)
    model = tiny_model("llama", layers=2, head_dim=16)
    session = Session(model, TinyTokenizer(), make_method("snapkv")[0], kv_bits=default)
    assert session.kv_bits is None
    session = Session(tiny_model("llama", layers=2, head_dim=32), TinyTokenizer(), make_method("snapkv")[0],
                      kv_bits=default)
    assert session.kv_bits == KVBits(8)


@pytest.mark.parametrize("bits, group_size, compresses, words", [
    (8, None, False, "choose a compressing method, or --kv-bits 16"),
    (16, 64, True, "here nothing is packed"),
    (None, 64, False, "here nothing is packed"),
])
def test_a_kv_bits_choice_that_cannot_apply_is_one_line(bits, group_size, compresses, words):
    with pytest.raises(CKVError, match=words):
        kv_bits_setting(bits, group_size, compresses)


@pytest.mark.parametrize("dim, group", [(64, 64), (128, 64), (96, 32), (32, 32)])
def test_the_default_group_is_mlx_lms_64_or_32_where_64_does_not_divide(dim, group):
    assert KVBits(8).group(dim) == group


@pytest.mark.parametrize("bits", [4, 8])
def test_a_head_size_of_96_packs_in_groups_of_32_and_decodes_as_mlx_lm_quantizes(bits):
    """Phi-3's head size: no --kv-group-size given, the rows pack in groups of 32 and
    the decode is masked mlx-lm's with its rows quantized in groups of 32."""
    prompt, forced = tokens(96), tokens(8, seed=9)
    model = tiny_model("llama", layers=2, heads=2, kv_heads=1, head_dim=96)
    method, _ = make_method("snapkv", fake_profile(model))
    session = Session(model, TinyTokenizer(), method, region=16, kv_bits=KVBits(bits))
    kept = spied(session)
    session.prefill(prompt)
    session.compress(40)
    assert session.caches[0].packed[0][1].shape[-1] == 96 // 32  # one scale per 32 values
    ours = []
    for token in forced:
        session.make_room(1)
        ours.append(model(mx.array([[token]]), cache=session.model_caches())[:, -1])
    reference = masked_plain_logits(model, prompt, forced, kept, (bits, 32))
    for a, b in zip(reference, ours):
        np.testing.assert_allclose(np.array(b), np.array(a), atol=1e-4 * max(1, np.abs(np.array(a)).max()))


def test_a_head_size_no_group_divides_is_one_line():
    with pytest.raises(CKVError, match="head size 80 is not a multiple of 32, the smallest group"):
        KVBits(8).pack(mx.zeros((1, 1, 4, 80)))
