"""Exact-fact records -> Markdown: per haystack kind, and the budget each method needs."""

from __future__ import annotations

from .report import (_table, accuracy_table, budget_order, difference_table, method_order, method_table, relative_table,
                     wilson_interval)

TASK = "facts"
MATCH_TARGET = 0.9  # a method matches the full cache once it keeps this share of its exact answers


def _facts(records, mode: str) -> list[dict]:
    return [r for r in records if r["task"] == TASK and r.get("mode") == mode]


def kinds(records) -> list[str]:
    from .facts import KINDS

    present = {r["kind"] for r in records if r["task"] == TASK}
    return [k for k in KINDS if k in present]


def agreement(records, method: str, budget: str) -> tuple[int, int]:
    """(kept, n): of the ``n`` samples the full cache answers exactly, how many ``method``
    at ``budget`` answers exactly too."""
    full = {r["sample"] for r in records if r["method"] == "full" and r["score"] == 1}
    mine = [r for r in records if r["method"] == method and r["budget"] == budget and r["sample"] in full]
    return sum(r["score"] == 1 for r in mine), len(mine)


def matching_budget(records, method: str) -> str:
    """The smallest budget at which ``method`` keeps at least 90 % of the full cache's
    exact answers (with its count), "none" up to the largest budget run, or "-" where
    the full cache answered nothing exactly."""
    budgets = budget_order([r for r in records if r["method"] == method])
    counts = [(budget, *agreement(records, method, budget)) for budget in budgets]
    if not any(n for _, _, n in counts):
        return "-"
    for budget, kept, n in counts:
        if n and kept >= MATCH_TARGET * n:
            return f"{budget} ({kept}/{n})"
    return f"none to {budgets[-1]}"


def agreement_table(records) -> str:
    """Per method and budget: the share of the full cache's exact answers kept, 95 % Wilson."""
    def cell(method, budget):
        kept, n = agreement(records, method, budget)
        low, high = wilson_interval(kept, n)
        return f"{100 * kept / n:.1f} [{100 * low:.1f}, {100 * high:.1f}] ({n})" if n else "-"

    return method_table(records, cell)


def budget_table(records, mode: str) -> str:
    """Per method (rows) and kind (columns, then all kinds): the first budget matching the
    full cache on 90 % of the samples it answers exactly."""
    chosen = _facts(records, mode)
    columns = kinds(chosen)
    rows = []
    for method in method_order(chosen):
        if method != "full":
            by_kind = [matching_budget([r for r in chosen if r["kind"] == k], method) for k in columns]
            rows.append([method, *by_kind, matching_budget(chosen, method)])
    return _table(["method", *columns, "all kinds"], rows)


def sections(records, mode: str) -> list[str]:
    """The exact-fact sections of the report for ``mode``."""
    chosen = _facts(records, mode)
    if not chosen:
        return []
    splits = sorted({r["split"] for r in chosen})
    out = [f"## Exact facts ({', '.join(splits)}), {mode}: the first budget that keeps 90 % of the full cache's "
           f"exact answers\n\n{budget_table(records, mode)}"]
    for kind in kinds(chosen) + [None]:
        mine = [r for r in chosen if kind is None or r["kind"] == kind]
        title = kind or "all kinds"
        text = f"### {title}: whole value exact (%), 95 % Wilson\n\n{accuracy_table(mine, TASK, mode=mode)}\n"
        text += f"Share of the full cache's exact answers kept (%), 95 % Wilson (samples):\n\n{agreement_table(mine)}\n"
        if kind is None:
            text += f"As % of the full cache on the same samples:\n\n{relative_table(mine, TASK, mode=mode)}\n"
            if differences := difference_table(mine, TASK, mode=mode):
                text += f"CompressKV variants against each baseline (points, 95 % paired bootstrap):\n\n{differences}\n"
        out.append(text)
    return out
