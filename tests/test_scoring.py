"""Window scoring over many keys: the NumPy spec's scores across score blocks, in bounded memory."""

import mlx.core as mx
import numpy as np
import pytest

from ckv_mlx.policy.scoring import SCORE_BLOCK, head_scores
from reference import pooled_scores, window_probs


@pytest.mark.parametrize("n", [SCORE_BLOCK - 3, 2 * SCORE_BLOCK + 5, 3 * SCORE_BLOCK])  # the window inside / across a block
@pytest.mark.parametrize("pooling", ["avg", "max"])
def test_scores_over_several_blocks_are_the_specs(n, pooling):
    mx.random.seed(n)
    queries, keys = mx.random.normal((6, 8, 16)) * 2, mx.random.normal((2, n, 16)) * 2
    heads = [0, 4, 5]
    expected = pooled_scores(window_probs(np.array(queries), np.array(keys), heads, group_size=3), 8, 5, pooling)
    got = head_scores(queries, keys, heads, 16**-0.5, 5, pooling)
    np.testing.assert_allclose(np.array(got), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16])
def test_scoring_memory_does_not_grow_with_every_key(dtype):
    """[heads, window, N] float32 probabilities at 16K keys would be 4.5 MiB, 3x the keys in
    float16: the scoring holds a few blocks of them and the scores."""
    n, heads = 16 * SCORE_BLOCK, 9
    queries, keys = mx.random.normal((heads, 8, 64)).astype(dtype), mx.random.normal((3, n, 64)).astype(dtype)
    mx.eval(queries, keys)
    mx.clear_cache()
    held = mx.get_active_memory()
    mx.reset_peak_memory()
    mx.eval(head_scores(queries, keys, list(range(heads)), 0.125, 5, "avg"))
    scores_bytes = heads * n * 4
    assert mx.get_peak_memory() - held < 8 * scores_bytes  # the probabilities alone: 8 (window rows) x this
