"""Hand-checked tiny cases for the NumPy reference in tests/reference.py."""

from __future__ import annotations

import numpy as np
import pytest

from reference import (
    pooled_scores,
    pyramid_budgets,
    select_compresskv,
    select_compresskv_gqa,
    select_snapkv,
    select_streamingllm,
    window_probs,
)

T, W, D = 40, 8, 4


def test_uniform_logits_follow_the_causal_window():
    q = np.zeros((1, 2, 2))
    k = np.ones((1, 12, 2))
    probs = window_probs(q, k, [0], group_size=1)
    np.testing.assert_allclose(probs[0, 0, :11], 1 / 11)
    assert probs[0, 0, 11] == 0.0
    np.testing.assert_allclose(probs[0, 1], 1 / 12)


def test_log_keys_give_proportional_probs():
    weights = np.arange(1.0, 13.0)
    q = np.ones((1, 2, 1))
    k = np.log(weights)[None, :, None]
    probs = window_probs(q, k, [0], group_size=1, scale=1.0)
    np.testing.assert_allclose(probs[0, 0], np.append(weights[:11] / 66, 0.0))
    np.testing.assert_allclose(probs[0, 1], weights / 78)


def test_query_head_reads_kv_head_of_its_group():
    q = np.ones((4, 2, 1))
    k = np.stack([np.zeros(12), np.log(np.arange(1.0, 13.0))])[:, :, None]
    probs = window_probs(q, k, [0, 3], group_size=2, scale=1.0)
    np.testing.assert_allclose(probs[0, 1], 1 / 12)
    np.testing.assert_allclose(probs[1, 1], np.arange(1.0, 13.0) / 78)


def test_default_scale_is_inverse_sqrt_head_dim():
    q = np.zeros((1, 1, 4))
    q[0, 0, 0] = 1.0
    k = np.zeros((1, 2, 4))
    k[0, 0, 0] = 2.0
    probs = window_probs(q, k, [0], group_size=1)
    np.testing.assert_allclose(probs[0, 0, 0], np.exp(1.0) / (np.exp(1.0) + 1.0))


def test_avg_pool_counts_zero_padding_and_drops_window_columns():
    probs = np.zeros((1, 2, 12))
    probs[0, :, 5] = 1.0
    probs[0, 0, 0] = 1.0
    probs[0, 1, 10] = 7.0
    pooled = pooled_scores(probs, window=2)
    expected = np.zeros(10)
    expected[3:8] = 0.4
    expected[:3] += 0.2
    np.testing.assert_allclose(pooled[0], expected)


def test_max_pool_pads_with_minus_infinity():
    probs = np.full((1, 1, 12), -1.0)
    probs[0, 0, 0] = 3.0
    pooled = pooled_scores(probs, window=2, pooling="max")
    np.testing.assert_allclose(pooled[0], [3, 3, 3, -1, -1, -1, -1, -1, -1, -1])


def _background(seed=0, n_q=4, n_kv=2):
    rng = np.random.default_rng(seed)
    return 0.1 * rng.standard_normal((n_q, W, D)), 0.1 * rng.standard_normal((n_kv, T, D))


def _point(q, k, head, position, axis, strength=10.0):
    """Make query `head` attend strongly to `position` of its KV head (G = 2)."""
    k[head // 2, position, axis] = strength
    q[head, :, axis] = strength


def test_dominant_srh_key_is_selected_and_non_srh_key_is_not():
    q, k = _background()
    _point(q, k, head=1, position=17, axis=0)
    _point(q, k, head=2, position=30, axis=1)
    kept = select_compresskv(q, k, [1], budget=W + 1, kernel=1)
    np.testing.assert_array_equal(kept, [17, *range(T - W, T)])


@pytest.mark.parametrize("pooling", ["avg", "max"])
def test_pooling_spreads_a_dominant_key_to_its_neighbours(pooling):
    q, k = _background()
    _point(q, k, head=1, position=17, axis=0)
    kept = select_compresskv(q, k, [1], budget=W + 5, pooling=pooling)
    np.testing.assert_array_equal(kept, [15, 16, 17, 18, 19, *range(T - W, T)])


def test_short_prompt_keeps_everything():
    q, k = _background()
    np.testing.assert_array_equal(select_compresskv(q, k, [0], budget=T), np.arange(T))
    assert select_snapkv(q, k, budget=T + 3).shape == (2, T)


def test_selection_is_sorted_unique_and_holds_the_window():
    q, k = _background(seed=3)
    kept = select_compresskv(q, k, [0, 1, 2, 3], budget=20)
    assert kept.shape == (20,)
    assert np.all(np.diff(kept) > 0)
    assert set(range(T - W, T)) <= set(kept.tolist())


def test_snapkv_averages_contiguous_gqa_groups():
    q, k = _background()
    _point(q, k, head=0, position=5, axis=0, strength=6.0)
    _point(q, k, head=1, position=5, axis=0, strength=6.0)
    _point(q, k, head=2, position=20, axis=1)
    q[3] = 0.0
    kept = select_snapkv(q, k, budget=W + 1, kernel=1)
    np.testing.assert_array_equal(kept[:, 0], [5, 20])
    np.testing.assert_array_equal(kept[:, 1:], np.tile(np.arange(T - W, T), (2, 1)))


def test_compresskv_gqa_uses_own_group_srhs():
    q, k = _background()
    _point(q, k, head=0, position=5, axis=0)
    _point(q, k, head=3, position=20, axis=1)
    kept = select_compresskv_gqa(q, k, [0, 3], budget=W + 1, kernel=1)
    np.testing.assert_array_equal(kept[:, 0], [5, 20])
    shared = select_compresskv(q, k, [0, 3], budget=W + 2, kernel=1)
    np.testing.assert_array_equal(shared[:2], [5, 20])


def test_compresskv_gqa_falls_back_to_all_srhs():
    q, k = _background()
    _point(q, k, head=1, position=9, axis=0)
    kept = select_compresskv_gqa(q, k, [1], budget=W + 3)
    shared = select_compresskv(q, k, [1], budget=W + 3)
    np.testing.assert_array_equal(kept, np.tile(shared, (2, 1)))


def test_streamingllm_indices():
    np.testing.assert_array_equal(
        select_streamingllm(20, 10), [0, 1, 2, 3, 14, 15, 16, 17, 18, 19]
    )
    np.testing.assert_array_equal(select_streamingllm(10, 10), np.arange(10))
    np.testing.assert_array_equal(
        select_streamingllm(20, 10, sinks=10 - W), [0, 1, *range(12, 20)]
    )


def test_pyramid_budgets_match_hand_computation():
    budgets = pyramid_budgets(32, 128)
    assert budgets == [242 - 7 * layer for layer in range(32)]
    assert sum(budgets) == 4272
    assert pyramid_budgets(32, 512)[::31] == [991, 61]
    assert pyramid_budgets(32, 128, prompt_len=200) == [200 - 4 * layer for layer in range(32)]
