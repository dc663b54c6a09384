"""Per-KV-head budgets (AdaKV): the selection against a NumPy reference, and the padded
layout's decode, re-scores, bytes and save/resume against plain mlx-lm."""

import mlx.core as mx
import numpy as np
import pytest

import reference as ref
from ckv_mlx.chat import session_file
from ckv_mlx.chat.session_file import SavedSession
from ckv_mlx.policy.methods import AdaSnapKV, SnapKV, make_method
from ckv_mlx.kv.quantized import KVBits
from ckv_mlx.engine.session import Session
from fakes import fake_profile
from test_kv_bits import CLOSE, GROUP, model_in, spied, tokens
from test_selection import ours, random_layer
from tiny import FAMILIES, HALF, TinyTokenizer, mac_model, masked_plain_logits, tiny_model


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("kv_heads, budget", [(2, 32), (4, 40)])
def test_adakv_matches_numpy(seed, kv_heads, budget):
    q, k = random_layer(seed, q_heads=2 * kv_heads, kv_heads=kv_heads)
    k[0] *= 3  # one head far more peaked than the others: unequal shares
    got = ours(AdaSnapKV(), q, k, budget)
    want = ref.select_adakv(ref.snapkv_grouped(q, k), budget)
    np.testing.assert_array_equal(got, want)
    kept = (got >= 0).sum(axis=1)
    assert kept.sum() == kv_heads * budget and kept.max() > budget  # shared out unequally, in total the same
    assert kept.min() >= 8 + np.ceil(0.2 * (budget - 8))  # the window and each head's floor


def session_for(model, name="snapkv-ada", bits=None, region=16):
    method, _ = make_method(name, fake_profile(model))
    return Session(model, TinyTokenizer(), method, region=region, kv_bits=KVBits(bits, GROUP) if bits else None)


@pytest.mark.parametrize("dtype", ["float32", *HALF])
@pytest.mark.parametrize("bits", [None, 8])
@pytest.mark.parametrize("name", ["snapkv-ada", "compresskv-gqa-ada"])
def test_decode_matches_masked_mlx_lm_over_each_heads_rows(name, bits, dtype):
    """Each KV head attends to its own rows only (the padding hidden), as plain mlx-lm
    with every other row masked; 8-bit kept rows as mlx-lm quantizes them."""
    prompt, forced = tokens(96), tokens(12, seed=9)
    model = model_in(dtype)
    session = session_for(model, name, bits)
    kept = spied(session)
    session.prefill(prompt)
    session.compress(40)
    assert any(c.valid is not None for c in session.caches)  # some layer shared its budget unequally
    ours_ = []
    for token in forced:
        session.make_room(1)
        ours_.append(model(mx.array([[token]]), cache=session.model_caches())[:, -1])
    visible = {layer: np.where(np.array(rows) >= 0, np.array(rows), len(prompt)) for layer, rows in kept.items()}
    reference = masked_plain_logits(model, prompt, forced, visible, (bits, GROUP) if bits else None)
    for step, (a, b) in enumerate(zip(reference, ours_)):
        a, b = (np.array(x.astype(mx.float32)) for x in (a, b))
        np.testing.assert_allclose(b, a, atol=CLOSE[dtype] * max(1, np.abs(a).max()), err_msg=f"step {step}")


def test_bytes_count_the_padding_allocated_and_the_rows_holding_tokens_apart():
    session = session_for(tiny_model("llama", layers=2, kv_heads=2, heads=4, head_dim=32))
    session.prefill(tokens(120))
    session.compress(32)
    for cache in session.caches:
        assert cache.nbytes == sum(x.nbytes for x in cache.arrays())
        assert cache.capacity == cache.bound + cache.region
        visible = 32 * 2 if cache.valid is None else cache.valid.sum().item()
        assert visible == 2 * 32  # the layer's budget over its 2 KV heads
        per_head_row = cache.row_bytes // 2
        assert cache.rows_nbytes == visible * per_head_row


def test_a_long_decode_re_scores_each_head_within_the_layers_budget():
    session = session_for(tiny_model("llama", layers=2, kv_heads=2, heads=4, head_dim=32), region=8)
    logits = session.prefill(tokens(200))
    session.compress(40)
    for _ in session.generate(logits, 40):  # five re-scores
        for cache in session.caches:
            assert cache.length <= cache.bound + cache.region and cache.capacity <= cache.bound + cache.region
            seen = cache.visible_rows()
            held = 2 * cache.length if seen is None else seen.sum().item()
            assert held <= 2 * (40 + cache.region)  # never more tokens than the budget and the region
            if cache.valid is not None:  # a re-score never keeps a padding row: each keeps the budget in tokens
                assert cache.valid.sum().item() == 2 * 40
    assert session.stats.generated_tokens == 40


@pytest.mark.parametrize("bits", [None, 4])
def test_a_saved_padded_cache_continues_token_for_token(bits, tmp_path):
    def session():
        return session_for(tiny_model("llama", layers=2, kv_heads=2, heads=4, head_dim=32), bits=bits, region=8)

    first = session()
    logits = first.prefill(tokens(120))
    first.compress(32)
    head = list(first.generate(logits, 5))  # past a re-score
    session_file.write(tmp_path / "s.ckv", SavedSession({}, first.caches, first.remembered_queries(), {}))
    expected = list(first.generate(first.model(mx.array([[head[-1]]]), cache=first.model_caches())[:, -1], 12))
    saved = session_file.read(tmp_path / "s.ckv")
    caches = saved.caches
    assert any(c.valid is not None for c in caches)
    again = session()
    again.take_over(caches, saved.window_queries)
    got = list(again.generate(again.model(mx.array([[head[-1]]]), cache=again.model_caches())[:, -1], 12))
    assert got == expected


@pytest.mark.parametrize("method", [AdaSnapKV(pooling="max"), SnapKV(pooling="max")])
def test_a_padding_row_is_never_kept_even_beside_the_best_row(method):
    """Max pooling spreads the best row's score to its neighbours: a padding row there
    must still lose to every row that holds a token."""
    q, k = random_layer(0, q_heads=4, kv_heads=2, n=100)
    scores = np.array(method.scores(0, mx.array(q), mx.array(k), q.shape[-1] ** -0.5))
    best = int(scores[0].argmax())
    padding = best + 1 if best + 1 < 92 else best - 1
    visible = np.ones((2, 100), dtype=bool)
    visible[0, padding] = False
    keep = np.array(method.keep_indices(0, mx.array(q), mx.array(k), q.shape[-1] ** -0.5, 40, None, mx.array(visible)))
    assert padding not in keep[0] and best in keep[0]


@pytest.mark.parametrize("arch", FAMILIES)
def test_every_family_shares_its_budgets_out_per_head_and_answers(arch):
    """Sliding-window, recurrent and shared-KV layers beside the padded ones: the
    compressing layers keep each head's share, and decode runs past a re-score."""
    model = tiny_model(arch, layers=4, head_dim=32)
    session = session_for(model, region=8)
    logits = session.prefill(tokens(150))
    session.compress(32)
    assert list(session.generate(logits, 12))
    for cache in session.caches:
        kv_heads = cache.keys.shape[1]
        seen = cache.visible_rows()
        assert (kv_heads * cache.length if seen is None else seen.sum().item()) <= kv_heads * (32 + cache.region)


@pytest.mark.parametrize("bits", [None, 8])
def test_a_bounded_read_shares_each_chunks_budget_per_head(bits):
    session = session_for(tiny_model("llama", layers=2, kv_heads=2, heads=4, head_dim=32), bits=bits)
    session.prefill(tokens(300), working_budget=64, chunk=64)
    session.compress(48)
    for cache in session.caches:
        kept = 2 * 48 if cache.valid is None else cache.valid.sum().item()
        assert kept == 2 * 48 and cache.packed_rows == (cache.bound if bits else 0)


@pytest.mark.parametrize("dtype", ["float32", *HALF])
def test_kv_sharing_layers_hide_the_padding_of_the_layer_they_read(dtype):
    """Gemma 4's last layers attend an earlier layer's rows (mlx-lm calls them with no
    cache): what they compute must not depend on that layer's padding rows, as the
    layer's own attention does not. Noise written into the padding changes nothing."""
    shape = dict(layers=6, heads=8, kv_heads=2, head_dim=32)  # layers 4 and 5 read layers 2 and 3
    model = tiny_model("gemma4_text", **shape) if dtype == "float32" else mac_model("gemma4_text", dtype, **shape)
    session = session_for(model, "snapkv-ada")
    session.prefill(tokens(96))
    session.compress(32)
    assert session.caches[-1].valid is not None  # layer 3, which layer 5 reads, shared its budget unequally
    before = session.snapshot()
    clean = model(mx.array([[7]]), cache=session.model_caches())[:, -1]
    session.restore(before)
    for cache in (c for c in session.caches if c.valid is not None):
        hidden = ~cache.visible_rows()[None, :, :, None]
        for rows in (cache.keys, cache.values):
            rows[..., : cache.length, :] = mx.where(hidden, mx.array(50.0, rows.dtype), rows[..., : cache.length, :])
    noisy = model(mx.array([[7]]), cache=session.model_caches())[:, -1]
    a, b = (np.array(x.astype(mx.float32)) for x in (clean, noisy))
    np.testing.assert_allclose(b, a, atol=CLOSE[dtype] * max(1, np.abs(a).max()))
