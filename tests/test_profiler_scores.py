"""The profiler's arithmetic against the method doc, written out by hand."""

import mlx.core as mx
import numpy as np
import pytest

from ckv_mlx.errors import CKVError
from ckv_mlx.eval.niah import answer_span, rouge1_recall
from ckv_mlx.profile.__main__ import default_first_k, default_lengths
from ckv_mlx.profile.layers import layer_errors
from ckv_mlx.profile.srh import head_scores, mean_scores, rank_heads


class FakeRecorder:
    def __init__(self, mass, argmax):
        self.mass = [mx.array(m) for m in mass]
        self.argmax = [mx.array(a) for a in argmax]


def test_head_scores_follow_the_formulas():
    # prompt: span is rows 2..4 holding tokens 7, 8, 7
    tokens = [1, 2, 7, 8, 7, 3]
    span = range(2, 5)
    generated = [7, 9, 8]  # 7 occurs twice in the span, 9 never, 8 once
    mass = [[0.5, 0.1], [0.9, 0.9], [0.2, 0.4]]  # per step, per head (one layer)
    argmax = [[4, 0], [2, 3], [3, 5]]
    srh, retrieval = head_scores([FakeRecorder(mass, argmax)], tokens, span, generated)
    # S = sum_t c_t * mass_t: c = [2, 0, 1]
    np.testing.assert_allclose(srh, [[2 * 0.5 + 1 * 0.2, 2 * 0.1 + 1 * 0.4]])
    # classic: step 0 head 0 looks at row 4 (token 7 == y) -> 1/3; step 2 head 0 row 3 (8 == y) -> 1/3;
    # head 1: step 1 row 3 holds 8 != 9; step 2 row 5 outside the span
    np.testing.assert_allclose(retrieval, [[2 / 3, 0.0]])


def test_mean_scores_use_counted_trials_only_and_rank_breaks_ties_by_id():
    records = [{"counted": True, "srh": [[1.0, 3.0, 3.0]]}, {"counted": False, "srh": [[9.0, 9.0, 9.0]]},
               {"counted": True, "srh": [[3.0, 1.0, 3.0]]}]
    scores, counted = mean_scores(records, "srh", (1, 3))
    assert counted == 2
    np.testing.assert_allclose(scores, [[2.0, 2.0, 3.0]])
    order, ranked = rank_heads(scores)
    assert order == [[2, 0, 1]] and ranked == [[3.0, 2.0, 2.0]]
    assert mean_scores([records[1]], "srh", (1, 3))[1] == 0


def test_answer_span_needs_more_than_90_percent_of_the_target_set():
    target = list(range(10, 20))
    prompt = [1, 2] + list(range(10, 19)) + [99] + list(range(10, 20))
    # first window covers 9 of 10 = 90 %, not more: the exact copy later wins
    assert answer_span(prompt, target) == range(12, 22)
    assert answer_span([1, 2, 3], target) is None


def test_rouge1_recall():
    assert rouge1_recall("eat a sandwich", "eat a sandwich in the park") == pytest.approx(3 / 6)
    assert rouge1_recall("nothing here", "smoked paprika") == 0.0


def test_layer_errors_normalise_per_dataset_then_average():
    records = [
        {"dataset": "a", "errors": [1.0, 3.0]},
        {"dataset": "a", "errors": [1.0, 3.0]},
        {"dataset": "b", "errors": [3.0, 1.0]},
        {"dataset": "b", "errors": None},
    ]
    # a: [2, 6] -> [.25, .75]; b: [.75, .25]; mean [.5, .5]
    np.testing.assert_allclose(layer_errors(records), [0.5, 0.5])
    with pytest.raises(CKVError, match="no prompt"):
        layer_errors([{"dataset": "a", "errors": None}])


def test_default_sweep_scales_with_the_model():
    assert default_lengths(8192) == [1000, 2600, 4200, 5700, 7300]
    assert default_lengths(2048)[0] == 400 and max(default_lengths(2048)) <= 2048 * 0.9
    assert default_first_k(32) == 4 and default_first_k(9) == 2 and default_first_k(2) == 2
