"""Budget allocators against the method doc's published vectors and hand computations."""

import json

import numpy as np
import pytest

from ckv_mlx.policy.budgets import error_aware, parse_budget, pyramid, uniform
from ckv_mlx.errors import CKVError
from reference_data import reference_file


# docs/compresskv-method.md section 3: allocations from the reference avg_score files.
VECTORS = {
    ("Llama-3.1-8B-Instruct", 128): [89, 90, 143, 118, 118, 145, 112, 126, 169, 163, 168, 153, 88, 165, 147, 148, 125, 141, 138, 143, 161, 109, 138, 147, 136, 121, 119, 130, 100, 88, 104, 54],  # noqa: E501
    ("Llama-3.1-8B-Instruct", 512): [315, 324, 589, 464, 462, 597, 432, 503, 712, 687, 707, 639, 311, 693, 607, 611, 497, 576, 564, 588, 678, 419, 564, 609, 554, 476, 468, 522, 373, 312, 391, 140],  # noqa: E501
    ("Mistral-7B-Instruct-v0.3", 128): [128, 73, 149, 83, 124, 122, 121, 161, 100, 170, 106, 144, 173, 99, 151, 170, 141, 108, 155, 132, 135, 127, 132, 113, 126, 127, 130, 91, 129, 99, 119, 158],  # noqa: E501
    ("Mistral-7B-Instruct-v0.3", 512): [510, 235, 617, 288, 494, 482, 479, 676, 374, 723, 403, 591, 732, 369, 625, 722, 575, 410, 649, 533, 549, 508, 534, 437, 501, 505, 524, 328, 516, 368, 467, 660],  # noqa: E501
}


def _avg_score(model: str) -> list[float]:
    path = reference_file(f"scores/{model}_layer_score.jsonl")
    return json.loads(path.read_text())["avg_score"]


@pytest.mark.parametrize(("model", "budget"), sorted(VECTORS))
def test_error_aware_matches_reference_vectors(model, budget):
    assert error_aware(_avg_score(model), budget) == VECTORS[model, budget]


@pytest.mark.parametrize("seed", range(40))
def test_error_aware_sum_and_bounds_on_random_scores(seed):
    rng = np.random.default_rng(seed)
    layers = int(rng.integers(1, 81))
    raw = rng.random(layers) ** rng.uniform(0.2, 8)  # from flat to very peaked
    raw[rng.random(layers) < 0.2] = 0.0
    scores = (raw / raw.sum() if raw.sum() else np.full(layers, 1 / layers)).tolist()
    budget = int(rng.integers(32, 2049))
    budgets = error_aware(scores, budget)
    assert len(budgets) == layers
    assert all(isinstance(b, int) for b in budgets)
    assert sum(budgets) == budget * layers
    assert min(budgets) >= 32 and max(budgets) <= 3 * budget


def test_error_aware_fills_a_shortfall_highest_error_first():
    # 32 + round(0.3 * 4) = 33 three times, 32 + round(0.1 * 4) = 32: one token short.
    assert error_aware([0.3, 0.3, 0.3, 0.1], 33) == [34, 33, 33, 32]


def test_error_aware_removes_an_excess_lowest_error_first():
    # 32 + round(1.5) = 34, 32 + round(0.75) = 33 twice: one token over; tie -> lower layer.
    assert error_aware([0.5, 0.25, 0.25], 33) == [34, 32, 33]


def test_error_aware_clamps_at_three_times_the_budget_and_spreads_the_rest():
    # One-hot errors: layer 0 would get 32 + 8*32 = 288 > 120, so it is clamped to 120;
    # the 168 missing tokens go to layers 1..31 (equal errors, lower layer first):
    # 5 full passes (155) then 13 more.
    budgets = error_aware([1.0] + [0.0] * 31, 40)
    assert budgets == [120] + [38] * 13 + [37] * 18


def test_error_aware_rounds_half_to_even():
    # spare = 2: 0.25 * 2 = 0.5 -> 0 and 0.75 * 2 = 1.5 -> 2; the sum already matches.
    assert error_aware([0.25, 0.75], 33) == [32, 34]


def test_error_aware_too_small_budget_names_the_minimum():
    with pytest.raises(CKVError, match="minimum is 32"):
        error_aware([0.5, 0.5], 31)


@pytest.mark.parametrize("errors", [[], [0.5, -0.1], [float("nan"), 1.0]])
def test_error_aware_rejects_bad_errors(errors):
    with pytest.raises(CKVError):
        error_aware(errors, 128)


def test_uniform():
    assert uniform(3, 128) == [128, 128, 128]
    with pytest.raises(CKVError):
        uniform(3, 0)


def test_pyramid_matches_hand_computation():
    # B=128, w=8, beta=20: base 120, min 120//20 = 6, max 240-6 = 234,
    # steps (234-6)//31 = 7, layer l keeps 234 - 7l + 8.
    budgets = pyramid(32, 128, level=False)
    assert budgets[0] == 242 and budgets[1] == 235 and budgets[31] == 25
    assert budgets == [242 - 7 * layer for layer in range(32)]


def test_pyramid_caps_at_the_prompt_length_like_the_reference():
    # prompt 200: max 234 >= 192 -> max 192, min 240-192 = 48, steps 144//31 = 4.
    assert pyramid(32, 128, prompt_len=200, level=False) == [200 - 4 * layer for layer in range(32)]


def test_pyramid_small_cases():
    # base 24, min 24//20 = 1, max 47, steps 46//3 = 15.
    assert pyramid(4, 32, level=False) == [55, 40, 25, 10]
    assert pyramid(1, 64) == [64]
    with pytest.raises(CKVError, match="window"):
        pyramid(32, 8)


@pytest.mark.parametrize(("layers", "budget", "prompt_len"), [(30, 64, None), (32, 128, None), (4, 32, None),
                                                             (32, 128, 200), (30, 256, None), (2, 16, None)])
def test_pyramid_is_levelled_to_exactly_b_times_l(layers, budget, prompt_len):
    from reference import pyramid_budgets

    raw = pyramid_budgets(layers, budget, prompt_len=prompt_len)
    excess = sum(raw) - layers * budget
    every, first = divmod(excess, layers)  # every layer gives back `every`, the first `first` one more
    expected = [b - every - (layer < first) for layer, b in enumerate(raw)]

    budgets = pyramid(layers, budget, prompt_len=prompt_len)

    assert budgets == expected and sum(budgets) == layers * budget
    assert budgets == sorted(budgets, reverse=True) and min(budgets) >= 8


def test_pyramid_at_64_on_30_layers_was_16_percent_over():
    from reference import pyramid_budgets

    assert sum(pyramid_budgets(30, 64)) == 2235  # 315 tokens (16 %) over 30 x 64


@pytest.mark.parametrize(
    ("text", "prompt_len", "tokens"),
    [
        ("128", 10_000, 128),
        (" 64 ", 10, 64),
        ("5%", 1000, 50),
        ("2.5 %", 1000, 25),
        ("0.05", 1000, 50),
        (".5", 7, 4),  # round(3.5) -> 4 (half to even)
        ("0.25", 10, 2),  # round(2.5) -> 2 (half to even)
        ("1.0", 300, 300),
        ("1%", 20, 1),  # 0.2 tokens -> at least 1
    ],
)
def test_parse_budget(text, prompt_len, tokens):
    assert parse_budget(text, prompt_len) == tokens


@pytest.mark.parametrize("text", ["", "abc", "0", "-5", "1.5", "150%", "0%", "5 tokens", "1e3"])
def test_parse_budget_rejects_nonsense(text):
    with pytest.raises(CKVError, match="budget"):
        parse_budget(text, 1000)
