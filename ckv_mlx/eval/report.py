"""Evaluation records -> Markdown tables and PNG plots (no MLX here)."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from statistics import mean

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..errors import read_jsonl
from .reading import TASKS as READING_TASKS

METHOD_ORDER = ("full", "compresskv", "compresskv-gqa", "compresskv-gqa-ada", "snapkv", "snapkv-ada", "pyramidkv",
                "streamingllm", "keydiff")
BOOTSTRAP_RESAMPLES = 2000
RULER_TASKS = ("multikey", "multivalue", "variable-tracking", "frequent-words")


def load_records(path: str | Path) -> list[dict]:
    """Records of an evaluation run log (its first line holds the settings); a method
    whose kept rows were quantized is a method of its own here: "snapkv 4-bit"."""
    return labelled([row for _, row in read_jsonl(path, "records") if "settings" not in row])


def labelled(records: list[dict]) -> list[dict]:
    """``records`` with each quantized one's method named by its bits (once)."""
    return [_labelled(r) for r in records]


def _labelled(record: dict) -> dict:
    suffix = f" {record.get('kv_bits')}-bit"
    if not record.get("kv_bits") or record["method"].endswith(suffix):
        return record
    return {**record, "method": record["method"] + suffix}


def method_order(records) -> list[str]:
    """The usual order of methods, each followed by its quantized variants (more bits first)."""
    def rank(name: str):
        base, _, bits = name.partition(" ")
        family = base.split("+")[0]  # a method with options sorts beside its own
        known = METHOD_ORDER.index(family) if family in METHOD_ORDER else len(METHOD_ORDER)
        return known, base, -int(bits.split("-")[0]) if bits else -16  # as computed: 16 bits or more

    return sorted({r["method"] for r in records}, key=rank)


def budget_order(records) -> list[str]:
    """Token budgets ascending, then percentages ascending."""
    budgets = {r["budget"] for r in records if r["budget"] is not None}
    tokens = sorted((b for b in budgets if not b.endswith("%")), key=float)
    shares = sorted((b for b in budgets if b.endswith("%")), key=lambda b: float(b[:-1]))
    return tokens + shares


def _scores(records, method, budget, metric) -> list[float]:
    return [r[metric] for r in records if r["method"] == method
            and (method == "full" or r["budget"] == budget) and r.get(metric) is not None]


def _cell(records, method, budget, metric) -> float | None:
    values = _scores(records, method, budget, metric)
    return mean(values) if values else None


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"


def _select(records, task, mode="query-aware"):
    return [r for r in records if r["task"] == task and r.get("mode") == mode and r.get("turn", 1) == 1]


def accuracy_table(records, task, metric="score", mode="query-aware") -> str:
    """Mean ``metric`` (%) per method (rows) and budget (columns), with the KV share kept;
    accuracy (``score``) with its 95 % Wilson interval."""
    chosen = _select(records, task, mode)
    budgets = budget_order(chosen)
    shown = _with_interval if metric == "score" else lambda scores: _pct(mean(scores)) if scores else "-"
    rows = []
    for method in method_order(chosen):
        rows.append([method] + [shown(_scores(chosen, method, b, metric)) for b in budgets])
    kept = {m: tuple(_pct(_share(chosen, b, m)) for b in budgets) for m in method_order(chosen) if m != "full"}
    per_budget = [set(column) - {"-"} for column in zip(*kept.values())]
    if all(len(shares) <= 1 for shares in per_budget):  # every method allocates the same share: one row
        rows.append(["*KV cache kept, %*", *(next(iter(shares), "-") for shares in per_budget)])
    else:  # e.g. per-head budgets' padding: each method's own
        rows += [[f"*KV kept, % ({m})*", *shares] for m, shares in kept.items()]
    return _table(["method"] + budgets, rows)


def _share(records, budget, method: str) -> float | None:
    """Mean KV share kept, from the records that carry their allocated bytes where any do:
    older records' ``kv_fraction`` may count rows held (before memory figures were allocated)."""
    mine = [r for r in records if r["budget"] == budget and r["method"] == method]
    mine = [r for r in mine if "kv_bytes" in r] or mine
    return mean(r["kv_fraction"] for r in mine) if mine else None


def method_table(records, cell) -> str:
    """A row per compressing method of ``records`` and a column per budget, each cell
    ``cell(method, budget)``."""
    budgets = budget_order(records)
    rows = [[m] + [cell(m, b) for b in budgets] for m in method_order(records) if m != "full"]
    return _table(["method"] + budgets, rows)


def relative_table(records, task, metric="score", mode="query-aware") -> str:
    """Each method's mean as % of the full cache's mean on the same samples, with a 95 %
    paired bootstrap interval over the samples."""
    chosen = _select(records, task, mode)
    full = {r["sample"]: r[metric] for r in chosen if r["method"] == "full"}

    def cell(method, budget):
        pairs = [(r[metric], full[r["sample"]]) for r in chosen
                 if r["method"] == method and r["budget"] == budget and r["sample"] in full]
        base = sum(f for _, f in pairs)
        if not pairs or base == 0:
            return "-"
        low, high = ratio_interval(pairs)
        return f"{100 * sum(m for m, _ in pairs) / base:.1f} [{100 * low:.1f}, {100 * high:.1f}]"

    return method_table(chosen, cell)


def difference_table(records, task, metric="score", mode="query-aware") -> str:
    """Each CompressKV variant against each baseline of the same bits, on the samples both
    answered: the difference in mean ``metric`` (points), its 95 % paired bootstrap interval,
    and whether the variant is ahead, level or behind by that interval."""
    chosen = _select(records, task, mode)
    methods = [m for m in method_order(chosen) if m != "full"]
    variants = [m for m in methods if m.startswith("compresskv")]
    budgets = budget_order(chosen)
    rows = []
    for variant in variants:
        for baseline in methods:
            if baseline.startswith("compresskv") or baseline.partition(" ")[2] != variant.partition(" ")[2]:
                continue
            cells = []
            for b in budgets:
                ours = {r["sample"]: r[metric] for r in chosen if r["method"] == variant and r["budget"] == b}
                theirs = {r["sample"]: r[metric] for r in chosen if r["method"] == baseline and r["budget"] == b}
                common = sorted(ours.keys() & theirs.keys())
                cells.append(compared([(ours[s], theirs[s]) for s in common]) if common else "-")
            rows.append([f"{variant} vs {baseline}"] + cells)
    return _table(["comparison"] + budgets, rows) if rows else ""


def modes_table(records, task, metric="score") -> str:
    """Query-aware and query-agnostic side by side, per budget."""
    aware, agnostic = _select(records, task, "query-aware"), _select(records, task, "query-agnostic")
    budgets = budget_order(aware + agnostic)
    rows = []
    for method in method_order(aware + agnostic):
        cells = []
        for b in budgets:
            cells += [_pct(_cell(aware, method, b, metric)), _pct(_cell(agnostic, method, b, metric))]
        rows.append([method] + cells)
    header = ["method"] + [f"{b} {m}" for b in budgets for m in ("aware", "agnostic")]
    return _table(header, rows)


def modes_difference_table(records, task, metric="score") -> str:
    """Each method's query-aware ``metric`` less its query-agnostic one on the same
    samples, per budget, with its 95 % paired interval and verdict."""
    aware, agnostic = _select(records, task, "query-aware"), _select(records, task, "query-agnostic")
    by_setting = {(r["method"], r["budget"], r["sample"]): r[metric] for r in agnostic if r[metric] is not None}

    def cell(method, budget):
        pairs = [(r[metric], by_setting[method, budget, r["sample"]]) for r in aware if r["method"] == method
                 and r["budget"] == budget and r[metric] is not None and (method, budget, r["sample"]) in by_setting]
        return compared(pairs) if pairs else "-"

    return method_table(aware, cell) if by_setting else ""


def fidelity_table(records, mode="query-aware", task: str | None = None) -> str:
    """Top-1 agreement (%) and mean KL against the full cache's answer, per method and
    budget (of ``task``'s records only, if given)."""
    chosen = [r for r in records if r.get("mode") == mode and r.get("top1") is not None
              and task in (None, r["task"])]
    budgets = budget_order(chosen)
    rows = []
    for method in method_order(chosen):
        cells = []
        for b in budgets:
            top1, kl = _cell(chosen, method, b, "top1"), _cell(chosen, method, b, "kl")
            cells.append("-" if top1 is None else f"{100 * top1:.1f} / {kl:.3f}")
        rows.append([method] + cells)
    return _table(["method"] + budgets, rows)


def bytes_table(records, task, mode="query-aware") -> str:
    """Every method and budget by the KV it kept (% of the full cache, allocated bytes),
    fewest first, with its accuracy and fidelity: what to keep for the same memory."""
    chosen = [r for r in _select(records, task, mode) if r["method"] != "full"]
    rows = []
    for method in method_order(chosen):
        for budget in budget_order([r for r in chosen if r["method"] == method]):
            share = _cell(chosen, method, budget, "kv_fraction")
            scores = [r["score"] for r in chosen if r["method"] == method and r["budget"] == budget]
            rows.append((share, [method, budget, _pct(share), _with_interval(scores),
                                 _pct(_cell(chosen, method, budget, "top1")), _kl(_cell(chosen, method, budget, "kl"))]))
    rows.sort(key=lambda row: row[0])
    return _table(["method", "budget", "KV kept, % of full", "accuracy % [95 % Wilson]", "top-1 %", "KL"],
                  [r for _, r in rows])


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95 % by default)."""
    if not n:
        return 0.0, 1.0
    p = successes / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, (centre - half) / (1 + z * z / n)), min(1.0, (centre + half) / (1 + z * z / n))


def _resampled_sums(pairs: list[tuple[float, float]], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Both sides' sums over bootstrap resamples of the sample pairs (a fixed seed: the same
    table every time)."""
    first, second = np.array(pairs, dtype=np.float64).T
    picks = np.random.default_rng(seed).integers(0, len(pairs), (BOOTSTRAP_RESAMPLES, len(pairs)))
    return first[picks].sum(axis=1), second[picks].sum(axis=1)


def ratio_interval(pairs: list[tuple[float, float]], seed: int = 0) -> tuple[float, float]:
    """95 % paired bootstrap interval of ``sum(method) / sum(full)`` over (method, full)
    sample pairs, resampling the samples."""
    sums, bases = _resampled_sums(pairs, seed)
    low, high = np.percentile(sums[bases > 0] / bases[bases > 0], [2.5, 97.5])
    return float(low), float(high)


def difference_interval(pairs: list[tuple[float, float]], seed: int = 0) -> tuple[float, float]:
    """95 % paired bootstrap interval of ``mean(a - b)`` over (a, b) sample pairs."""
    firsts, seconds = _resampled_sums(pairs, seed)
    low, high = np.percentile((firsts - seconds) / len(pairs), [2.5, 97.5])
    return float(low), float(high)


def compared(pairs: list[tuple[float, float]]) -> str:
    """``mean(a - b)`` in points with its 95 % paired interval, and what the interval says:
    ahead or behind when it excludes 0, level when it spans it."""
    difference = sum(a - b for a, b in pairs) / len(pairs)
    low, high = difference_interval(pairs)
    verdict = "ahead" if low > 0 else "behind" if high < 0 else "level"
    return f"{100 * difference:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}] {verdict}"


def _with_interval(scores: list[float]) -> str:
    if not scores:
        return "-"
    low, high = wilson_interval(sum(scores), len(scores))
    return f"{_pct(mean(scores))} [{_pct(low)}, {_pct(high)}]"


def _kl(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def followup_table(records) -> str:
    """Turn 1 / turn 2 accuracy (%) per policy and method, per budget."""
    chosen = [r for r in records if r["task"] == "followup"]
    budgets = budget_order(chosen)
    rows = []
    for policy in sorted({r["policy"] for r in chosen}):
        mine = [r for r in chosen if r["policy"] == policy]
        for method in method_order(mine):
            cells = []
            for b in budgets:
                turns = [_cell([r for r in mine if r["turn"] == t], method, b, "score") for t in (1, 2)]
                cells.append(f"{_pct(turns[0])} / {_pct(turns[1])}")
            last = [r for r in mine if r["turn"] == 2], method, budgets[-1] if budgets else None
            held = _cell(*last, "kv_ram_bytes")
            rows.append([policy, method] + cells + [_pct(_cell(*last, "kv_fraction")),
                                                   "-" if held is None else f"{held / 2**20:.2f}"])
    last = budgets[-1] if budgets else "-"
    return _table(["policy", "method"] + budgets + [f"KV kept after turn 2, % ({last})",
                                                  f"KV in memory for turn 2, MiB ({last})"], rows)


def followup_length_table(records, method: str) -> str:
    """``method``'s follow-ups per length and policy: turn 1 / turn 2 accuracy (%) and
    the KV in memory for turn 2 (MiB), per budget."""
    chosen = [r for r in records if r["task"] == "followup" and r["method"] == method]
    budgets = budget_order(chosen)
    rows = []
    for length in sorted({r["length"] for r in chosen}):
        for policy in sorted({r["policy"] for r in chosen}):
            mine = [r for r in chosen if r["length"] == length and r["policy"] == policy]
            turns = [[r for r in mine if r["turn"] == t] for t in (1, 2)]
            accuracy = [f"{_pct(_cell(turns[0], method, b, 'score'))} / {_pct(_cell(turns[1], method, b, 'score'))}"
                        for b in budgets]
            held = [_cell(turns[1], method, b, "kv_ram_bytes") for b in budgets]
            rows.append([f"{length:,}", policy] + accuracy + ["-" if h is None else f"{h / 2**20:.2f}" for h in held])
    return _table(["length", "policy"] + budgets + [f"KV in memory, turn 2, MiB ({b})" for b in budgets], rows)


def heatmap(records, method, budget, path, metric="score", mode="query-aware"):
    """The paper's NIAH figure: depth (rows) x length (columns), mean ``metric``."""
    chosen = [r for r in _select(records, "niah", mode)
              if r["method"] == method and (method == "full" or r["budget"] == budget)]
    lengths = sorted({r["length"] for r in chosen})
    depths = sorted({r["depth"] for r in chosen})
    cells = defaultdict(list)
    for r in chosen:
        cells[(r["depth"], r["length"])].append(r[metric])
    grid = [[mean(cells[(d, n)]) if cells[(d, n)] else float("nan") for n in lengths] for d in depths]
    fig = Figure(figsize=(1.2 + 0.9 * len(lengths), 1.0 + 0.4 * len(depths)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [str(d) for d in depths])
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("needle depth (%)")
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7)
    overall = mean(r[metric] for r in chosen) if chosen else 0.0
    ax.set_title(f"{method} @ {budget or 'full'} ({mode}) mean {100 * overall:.1f}%", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def summary_plot(records, task, path, metric="score", mode="query-aware"):
    """Accuracy (%) against budget, one line per method, the full cache dashed."""
    chosen = _select(records, task, mode)
    budgets = budget_order(chosen)
    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for method in method_order(chosen):
        if method == "full":
            ax.axhline(100 * _cell(chosen, "full", None, metric), color="black", linestyle="--", label="full")
            continue
        ys = [_cell(chosen, method, b, metric) for b in budgets]
        ax.plot(range(len(budgets)), [None if y is None else 100 * y for y in ys], marker="o", label=method)
    ax.set_xticks(range(len(budgets)), budgets)
    ax.set_xlabel("budget (tokens per layer, or % of the prompt)")
    ax.set_ylabel(f"{task} accuracy (%)")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=8)
    ax.set_title(f"{task} ({mode})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def per_length(records, task, mode) -> str:
    """Where the records span several lengths: the accuracy table and the variants'
    differences at each length alone (the tables above pool them)."""
    lengths = sorted({r["length"] for r in _select(records, task, mode)})
    if len(lengths) < 2:
        return ""
    text = ""
    for length in lengths:
        at = [r for r in records if r.get("length") == length]
        text += f"### {task}, {mode}, {length:,} tokens: accuracy (%)\n\n{accuracy_table(at, task, mode=mode)}\n"
        if differences := difference_table(at, task, mode=mode):
            text += f"Each CompressKV variant against each baseline at {length:,} tokens (points):\n\n{differences}\n"
    return text


def reading_sections(records, task, modes, where: str = "", level: str = "##") -> list[str]:
    """A reading task's fidelity to the full cache per mode, each CompressKV variant
    against each baseline, and where query-aware selection helps (``where`` names the
    records' part, e.g. one length)."""
    sections = []
    for mode in modes:
        if any(r["task"] == task and r.get("mode") == mode and r.get("top1") is not None for r in records):
            sections.append(f"{level} {task}{where}, {mode}: fidelity to the full cache's answer, top-1 agreement % / "
                            f"mean KL\n\n{fidelity_table(records, mode, task)}")
            if differences := difference_table(records, task, "top1", mode):
                sections.append(f"Each CompressKV variant against each baseline, {task}{where}, {mode}: the difference "
                                f"in top-1 agreement (points) with its 95 % paired bootstrap interval:\n\n{differences}")
    if len(modes) > 1 and (helped := modes_difference_table(records, task, "top1")):
        sections.append(f"{level} {task}{where}: where query-aware selection helps: top-1 agreement, query-aware less "
                        f"query-agnostic (points, 95 % paired bootstrap interval)\n\n{helped}")
    return sections


def _file(*parts) -> str:
    return "-".join(str(p) for p in parts if p).replace("%", "pct").replace(" ", "-") + ".png"


def write_report(records, out_dir) -> str:
    """Write every plot into ``out_dir``; return the Markdown with every table that applies."""
    out_dir, records = Path(out_dir), labelled(records)
    out_dir.mkdir(parents=True, exist_ok=True)
    sections = []
    modes = sorted({r.get("mode") for r in records if r["task"] != "followup"})
    for task in ("niah",) + RULER_TASKS:
        for mode in modes:
            chosen = _select(records, task, mode)
            if not chosen:
                continue
            text = f"## {task}, {mode}: accuracy (%)\n\n{accuracy_table(records, task, mode=mode)}\n"
            text += f"As % of the full cache on the same samples:\n\n{relative_table(records, task, mode=mode)}\n"
            if differences := difference_table(records, task, mode=mode):
                text += ("Each CompressKV variant against each baseline on the same samples: the difference in "
                         f"accuracy (points) with its 95 % paired bootstrap interval:\n\n{differences}\n")
            if any(r.get("kv_bits") for r in chosen):
                text += f"By the KV kept (quantized rows count their bits):\n\n{bytes_table(records, task, mode)}\n"
            if task == "niah":
                text += f"ROUGE-1 recall (%):\n\n{accuracy_table(records, task, 'rouge1', mode)}\n"
                text += per_length(records, task, mode)
                summary = _file(task, mode, "summary")
                summary_plot(records, task, out_dir / summary, mode=mode)
                text += f"![accuracy vs budget]({summary})\n\n"
                for method in method_order(chosen):
                    for budget in [None] if method == "full" else budget_order([r for r in chosen if r["method"] == method]):
                        name = _file(task, mode, method, budget)
                        heatmap(records, method, budget, out_dir / name, mode=mode)
                        text += f"![{method} {budget or 'full'}]({name}) "
                text += "\n"
            sections.append(text)
        if len(modes) > 1 and any(_select(records, task, m) for m in modes):
            sections.append(f"## {task}: query-aware vs query-agnostic (%)\n\n{modes_table(records, task)}")
    from .facts_report import sections as fact_sections

    for mode in modes:
        sections += fact_sections(records, mode)
    if any(r.get("top1") is not None for r in records):
        for mode in modes:
            sections.append(f"## Fidelity to the full cache, {mode}: top-1 agreement % / mean KL\n\n"
                            f"{fidelity_table(records, mode)}")
    for task in READING_TASKS:
        sections += reading_sections(records, task, modes)
        lengths = sorted({r["length"] for r in records if r["task"] == task})
        if len(lengths) > 1:  # the tables above pool the lengths
            for length in lengths:
                at = [r for r in records if r["length"] == length]
                sections += reading_sections(at, task, modes, f", {length:,} tokens", "###")
    if any(r["task"] == "followup" for r in records):
        sections.append(f"## Follow-up questions: turn 1 / turn 2 accuracy (%)\n\n{followup_table(records)}")
        for method in method_order([r for r in records if r["task"] == "followup"]):
            if method != "full":
                sections.append(f"### {method} per length\n\n{followup_length_table(records, method)}")
    return "\n".join(sections)
