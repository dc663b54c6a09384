"""Per-layer KV budgets: uniform, error-aware (CompressKV) and pyramid (PyramidKV).

A budget is the number of prompt tokens a layer keeps after compression, the observation
window included. Every allocator takes the average budget B and returns one int per layer.
"""

from __future__ import annotations

import math
import re

from ..errors import CKVError


def check_budget(avg_budget: int | None, window: int) -> None:
    """Refuse, in one line, an average budget that does not exceed the observation window."""
    if avg_budget is None or avg_budget <= window:
        raise CKVError(f"budget {avg_budget} is too small: it must be more than the observation window "
                       f"({window} tokens)")


def uniform(n_layers: int, avg_budget: int) -> list[int]:
    """The same budget for every layer (SnapKV, StreamingLLM, CompressKV without errors)."""
    _check_positive("number of layers", n_layers)
    _check_positive("budget", avg_budget)
    return [avg_budget] * n_layers


def error_aware(
    layer_errors: list[float], avg_budget: int, min_budget: int = 32, max_factor: int = 3
) -> list[int]:
    """CompressKV's error-aware allocation (method doc section 3).

    b_l = min + round(s_l * (B*L - min*L)) (round half to even), clamped to [min, max_factor*B];
    then the total is restored to B*L: while short, +1 to each layer still below the maximum
    in descending-error order, pass after pass; while over, -1 to each layer still above the
    minimum in ascending-error order. Equal errors go to the lower layer first.
    """
    scores = _check_errors(layer_errors)
    _check_positive("budget", avg_budget)
    _check_positive("minimum budget", min_budget)
    _check_positive("maximum factor", max_factor)
    if avg_budget < min_budget:
        raise CKVError(
            f"budget {avg_budget} is too small for error-aware budgets: the minimum is "
            f"{min_budget} tokens per layer; use a budget of at least {min_budget}"
        )
    n_layers = len(scores)
    total, max_budget = avg_budget * n_layers, max_factor * avg_budget
    spare = total - min_budget * n_layers
    budgets = [min(max(min_budget + round(s * spare), min_budget), max_budget) for s in scores]
    return _restore_total(budgets, scores, total, min_budget, max_budget)


def _restore_total(
    budgets: list[int], scores: list[float], total: int, low: int, high: int
) -> list[int]:
    """Add or remove single tokens, pass after pass, until the budgets sum to total."""
    descending = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    ascending = sorted(range(len(scores)), key=lambda i: (scores[i], i))
    diff = total - sum(budgets)
    while diff != 0:
        step, order = (1, descending) if diff > 0 else (-1, ascending)
        for i in order:
            if diff == 0:
                break
            if low <= budgets[i] + step <= high:
                budgets[i] += step
                diff -= step
    return budgets


def pyramid(
    n_layers: int, avg_budget: int, window: int = 8, beta: int = 20, prompt_len: int | None = None,
    level: bool = True,
) -> list[int]:
    """PyramidKV's linearly decreasing budgets, as the CompressKV repository computes them.

    Follows `PyradmidKVCluster.update_kv` in TUDa-HWAI/CompressKV
    (methods/pyramidkv/snapkv_utils.py), with base = B - w:

        min_num = base // beta
        max_num = 2 * base - min_num
        if prompt_len is given and max_num >= prompt_len - w:   # the reference's q_len cap
            max_num = prompt_len - w
            min_num = 2 * base - max_num
        steps = (max_num - min_num) // (L - 1)
        b_l = max_num - l * steps + w

    Because steps is floored, the total can exceed B*L by up to (L-1)*L/2 tokens (16 %
    at B=64 on 30 layers). The reference keeps that excess; with ``level`` (the default)
    it is taken back one token per layer, pass after pass from the first (largest)
    layer, so the total is exactly B*L like every other method's and the budgets still
    decrease. A single layer (where the reference would divide by zero) gets B.
    """
    _check_positive("number of layers", n_layers)
    _check_positive("window", window)
    _check_positive("beta", beta)
    if avg_budget <= window:
        raise CKVError(
            f"budget {avg_budget} leaves no room beside the {window}-token window; "
            f"use a budget above {window}"
        )
    if n_layers == 1:
        return [avg_budget]
    base = avg_budget - window
    min_num = base // beta
    max_num = 2 * base - min_num
    if prompt_len is not None and max_num >= prompt_len - window:
        max_num = prompt_len - window
        min_num = 2 * base - max_num
    steps = (max_num - min_num) // (n_layers - 1)
    budgets = [max_num - layer * steps + window for layer in range(n_layers)]
    if not level:
        return budgets
    return _restore_total(budgets, list(range(n_layers)), avg_budget * n_layers, window + 1, max(budgets))


_INTEGER = re.compile(r"\d+")
_PERCENT = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*%")
_FRACTION = re.compile(r"0?\.\d+|0\.|1\.0*")


def parse_budget(text: str, prompt_len: int) -> int:
    """Average tokens per layer from "128" (tokens), "5%" or "0.05" (share of the prompt)."""
    spec = str(text).strip()
    if _INTEGER.fullmatch(spec):
        tokens = int(spec)
        if tokens < 1:
            raise CKVError(f"budget {spec!r} must be at least 1 token")
        return tokens
    if _PERCENT.fullmatch(spec):
        share = float(spec.rstrip("% ")) / 100
    elif _FRACTION.fullmatch(spec):
        share = float(spec)
    else:
        raise CKVError(
            f"budget {text!r} is not understood: give tokens per layer (128), "
            "a percentage of the prompt (5%) or a fraction (0.05)"
        )
    if not 0 < share <= 1:
        raise CKVError(f"budget {text!r} must be a share above 0 and at most 100% of the prompt")
    return max(1, round(share * prompt_len))


def _check_positive(what: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CKVError(f"{what} must be a positive integer, got {value!r}")


def _check_errors(layer_errors: list[float]) -> list[float]:
    scores = [float(s) for s in layer_errors]
    if not scores:
        raise CKVError("layer errors are empty: give one error per layer")
    if any(not math.isfinite(s) or s < 0 for s in scores):
        raise CKVError("layer errors must be finite and not negative")
    return scores
