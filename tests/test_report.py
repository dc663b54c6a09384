"""Report tables and plots from hand-made records, checked against hand-computed numbers."""

import json

import matplotlib.image
import pytest

from ckv_mlx.errors import CKVError

from ckv_mlx.eval.report import (accuracy_table, budget_order, bytes_table, difference_interval, difference_table,
                                 fidelity_table, followup_length_table, modes_difference_table,
                                 followup_table, heatmap, load_records, method_order, per_length, relative_table,
                                 ratio_interval, wilson_interval, write_report)


def rec(method, budget, score, sample, depth=0, length=1000, mode="query-aware", task="niah", **extra):
    return {"task": task, "sample": sample, "length": length, "depth": depth, "mode": mode, "method": method,
            "budget": budget, "score": score, "rouge1": score, "kv_fraction": 1.0 if budget is None else 0.1,
            "top1": extra.pop("top1", None), "kl": extra.pop("kl", None), "turn": 1, "policy": None, **extra}


RECORDS = [
    rec("full", None, 1.0, "a"), rec("full", None, 1.0, "b"), rec("full", None, 0.0, "c"),
    rec("snapkv", "64", 1.0, "a"), rec("snapkv", "64", 0.0, "b"), rec("snapkv", "64", 0.0, "c"),
    rec("compresskv", "64", 1.0, "a"), rec("compresskv", "64", 1.0, "b"), rec("compresskv", "64", 0.0, "c"),
    rec("compresskv", "5%", 0.0, "a"), rec("compresskv", "32", 1.0, "a"),
]


def row(table, name):
    return next(line for line in table.splitlines() if line.startswith(f"| {name} |")).split(" | ")[1:]


def test_accuracy_table_means_order_and_gaps():
    table = accuracy_table(RECORDS, "niah")
    assert table.splitlines()[0] == "| method | 32 | 64 | 5% |"
    assert [line.split(" |")[0][2:] for line in table.splitlines()[2:5]] == ["full", "compresskv", "snapkv"]
    assert row(table, "full")[0].strip() == "66.7 [20.8, 93.9]"  # 2 of 3, with its Wilson interval
    assert [c.strip(" |").split(" [")[0] for c in row(table, "snapkv")] == ["-", "33.3", "-"]
    assert [c.strip(" |").split(" [")[0] for c in row(table, "compresskv")] == ["100.0", "66.7", "0.0"]


def test_kv_kept_is_one_row_when_every_method_allocates_alike_else_one_per_method():
    assert row(accuracy_table(RECORDS, "niah"), "*KV cache kept, %*")[1].strip() == "10.0"
    padded = RECORDS + [rec("snapkv-ada", "64", 1.0, "a", kv_fraction=0.12)]
    table = accuracy_table(padded, "niah")
    assert "*KV cache kept, %*" not in table
    assert row(table, "*KV kept, % (snapkv-ada)*")[1].strip() == "12.0"
    assert row(table, "*KV kept, % (snapkv)*")[1].strip() == "10.0"


def test_kv_kept_comes_from_records_with_allocated_bytes_where_a_method_has_them():
    older = rec("snapkv", "64", 1.0, "old", kv_fraction=0.064)  # rows held, before allocated bytes
    newer = [rec("snapkv", "64", 1.0, s, kv_fraction=0.078, kv_bytes=1) for s in ("x", "y")]
    assert row(accuracy_table([older] + newer, "niah"), "*KV cache kept, %*")[0].strip(" |") == "7.8"
    assert row(accuracy_table([older], "niah"), "*KV cache kept, %*")[0].strip(" |") == "6.4"


def test_relative_table_divides_by_full_on_the_same_samples():
    table = relative_table(RECORDS, "niah")
    # snapkv@64: 1 of full's 2 -> 50 %; compresskv@64: 2 of 2 -> 100 %; compresskv@32 on sample a: 1/1
    assert [c.strip(" |").split(" [")[0] for c in row(table, "snapkv")][1] == "50.0"
    assert [c.strip(" |").split(" [")[0] for c in row(table, "compresskv")][:2] == ["100.0", "100.0"]
    assert row(table, "compresskv")[0].strip() == "100.0 [100.0, 100.0]"  # the same on every resample


def test_the_paired_bootstrap_interval_is_the_normal_one_for_a_large_sample():
    pairs = [(1.0, 1.0)] * 100 + [(0.0, 1.0)] * 100  # half of full's: 0.5, standard error 0.035
    low, high = ratio_interval(pairs)
    assert low == pytest.approx(0.5 - 1.96 * 0.0354, abs=0.015) and high == pytest.approx(0.5 + 1.96 * 0.0354, abs=0.015)
    assert ratio_interval(pairs) == (low, high)  # a fixed seed


def test_the_paired_difference_interval_is_the_normal_one_for_a_large_sample():
    # a - b is +1 on 30 of 200 samples, 0 elsewhere: mean 0.15, standard error sqrt(0.15 x 0.85 / 200) = 0.0252
    pairs = [(1.0, 0.0)] * 30 + [(1.0, 1.0)] * 100 + [(0.0, 0.0)] * 70
    low, high = difference_interval(pairs)
    assert low == pytest.approx(0.15 - 1.96 * 0.0252, abs=0.01) and high == pytest.approx(0.15 + 1.96 * 0.0252, abs=0.01)


def test_difference_table_pairs_samples_and_says_ahead_level_or_behind():
    n = 40
    records = [rec("compresskv-gqa", "64", 1.0, s) for s in range(n)]
    records += [rec("snapkv", "64", float(s >= 10), s) for s in range(n)]  # gqa answers 10 more of 40
    records += [rec("pyramidkv", "64", float(s != 3), s) for s in range(n)]  # one more: within the noise
    records += [rec("keydiff", "64", 1.0, s) for s in range(n)] + [rec("keydiff", "64", 1.0, "only keydiff")]
    records += [rec("compresskv", "64", float(s >= 12), s) for s in range(n)]
    table = difference_table(records, "niah")
    assert table.splitlines()[0] == "| comparison | 64 |"
    assert row(table, "compresskv-gqa vs snapkv")[0].strip(" |").startswith("+25.0 [")
    assert row(table, "compresskv-gqa vs snapkv")[0].strip(" |").endswith("] ahead")
    assert row(table, "compresskv-gqa vs pyramidkv")[0].strip(" |").startswith("+2.5 [+0.0, ")
    assert row(table, "compresskv-gqa vs pyramidkv")[0].strip(" |").endswith("] level")
    assert row(table, "compresskv-gqa vs keydiff")[0].strip(" |") == "+0.0 [+0.0, +0.0] level"  # its extra sample unpaired
    assert row(table, "compresskv vs keydiff")[0].strip(" |").endswith("] behind")
    assert "compresskv vs compresskv-gqa" not in table and "vs full" not in table
    assert difference_table([r for r in records if r["method"] in ("snapkv", "keydiff")], "niah") == ""


def test_modes_difference_pairs_each_sample_with_itself():
    records = [rec("snapkv", "64", None, s, task="summary", mode=m, top1=t)
               for s, m, t in (("a", "query-aware", 0.9), ("b", "query-aware", 0.7), ("c", "query-aware", 0.5),
                               ("a", "query-agnostic", 0.4), ("b", "query-agnostic", 0.2), ("c", "query-agnostic", 0.1))]
    table = modes_difference_table(records, "summary", "top1")
    assert row(table, "snapkv")[0].strip(" |").startswith("+46.7 [")  # (0.5 + 0.5 + 0.4) / 3
    assert row(table, "snapkv")[0].strip(" |").endswith("] ahead")
    assert modes_difference_table([r for r in records if r["mode"] == "query-aware"], "summary", "top1") == ""


def test_budget_order_puts_tokens_first():
    assert budget_order([{"budget": b} for b in ["10%", "256", "5%", "32", None]]) == ["32", "256", "5%", "10%"]


def test_fidelity_and_followup_cells():
    records = [rec("snapkv", "64", 1.0, "a", top1=1.0, kl=0.1), rec("snapkv", "64", 1.0, "b", top1=0.5, kl=0.3)]
    assert "75.0 / 0.200" in fidelity_table(records)
    follow = [rec("snapkv", "64", s, "a", task="followup", policy="agnostic") | {"turn": t}
              for s, t in ((1.0, 1), (0.0, 2))]
    assert "100.0 / 0.0" in followup_table(follow)


def test_followup_per_length_rows_hold_each_policys_turns_and_memory():
    follow = [rec("snapkv", "64", s, "a", task="followup", policy=p, length=n) | {"turn": t, "kv_ram_bytes": kv}
              for n in (1000, 2000) for p, kv in (("agnostic", 2**20), ("per-question-disk", 3 * 2**20))
              for s, t in ((1.0, 1), (float(p != "agnostic"), 2))]
    table = followup_length_table(follow, "snapkv")
    assert "| 2,000 | agnostic | 100.0 / 0.0 | 1.00 |" in table
    assert "| 1,000 | per-question-disk | 100.0 / 100.0 | 3.00 |" in table


def test_heatmap_colours_follow_the_score(tmp_path):
    records = [rec("full", None, 1.0, "a", depth=0), rec("full", None, 0.0, "b", depth=100)]
    heatmap(records, "full", None, tmp_path / "h.png")
    image = matplotlib.image.imread(tmp_path / "h.png")
    column = image[:, int(image.shape[1] * 0.4)]
    green = [y for y, px in enumerate(column) if px[1] - px[0] > 0.3]
    red = [y for y, px in enumerate(column) if px[0] - px[1] > 0.3]
    assert green and red and max(green) < min(red)  # depth 0 (score 1) on top, in green


def test_load_records_names_a_bad_line(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"settings": {}}\n{"task": "niah"}\n{oops\n')
    with pytest.raises(CKVError, match="line 3"):
        load_records(path)


def test_write_report_writes_plots_and_sections(tmp_path):
    text = write_report(RECORDS, tmp_path)
    assert "## niah, query-aware: accuracy (%)" in text
    assert (tmp_path / "niah-query-aware-compresskv-5pct.png").exists()
    assert (tmp_path / "niah-query-aware-full.png").exists()


def test_per_length_tables_count_each_length_alone(tmp_path):
    records = RECORDS + [rec("full", None, 1.0, "d", length=2000), rec("compresskv", "64", 0.0, "d", length=2000),
                         rec("snapkv", "64", 1.0, "d", length=2000)]
    text = per_length(records, "niah", "query-aware")
    short, long = text.split("### niah, query-aware, 2,000 tokens")
    assert "### niah, query-aware, 1,000 tokens" in short
    assert row(short, "compresskv")[1].startswith("66.7 [")  # a, b, c: 2 of 3; d is not counted here
    assert row(long, "compresskv")[0].startswith("0.0 [") and row(long, "snapkv")[0].startswith("100.0 [")
    assert "compresskv vs snapkv" in long
    assert per_length(RECORDS, "niah", "query-aware") == ""  # one length: the pooled table says it all
    assert "### niah, query-aware, 2,000 tokens" in write_report(records, tmp_path)


def test_reading_tables_pool_the_lengths_then_count_each_alone(tmp_path):
    records = [rec(m, "128", None, f"summary/manual/L{n}", length=n, task="summary", mode=mode, top1=t, kl=0.1)
               for n, m, mode, t in ((8000, "compresskv", "query-aware", 0.9), (8000, "snapkv", "query-aware", 0.7),
                                     (16000, "compresskv", "query-aware", 0.5), (16000, "snapkv", "query-aware", 0.5),
                                     (8000, "compresskv", "query-agnostic", 0.6), (16000, "compresskv",
                                                                                   "query-agnostic", 0.4))]
    text = write_report(records, tmp_path)
    assert "### summary, 8,000 tokens, query-aware: fidelity" in text
    pooled, short, long = text.split("query-aware: fidelity")[1:]
    assert row(pooled, "compresskv")[0].startswith("70.0 / ")  # (0.9 + 0.5) / 2
    assert row(short, "compresskv")[0].startswith("90.0 / ") and "### summary, 16,000 tokens" in short
    assert row(long, "snapkv")[0].startswith("50.0 / ")
    assert row(long, "compresskv vs snapkv")[0].startswith("+0.0 [")
    assert row(short.split("where query-aware selection helps")[1], "compresskv")[0].startswith("+30.0 [")


def test_wilson_interval_is_the_textbook_one():
    low, high = wilson_interval(8, 10)  # p = 0.8, n = 10: 0.490 to 0.943 (Wilson 1927; e.g. Newcombe 1998, table I)
    assert round(low, 3) == 0.490 and round(high, 3) == 0.943
    assert wilson_interval(0, 20)[0] == 0.0 and wilson_interval(20, 20)[1] == pytest.approx(1.0)


def test_quantized_variants_are_methods_of_their_own_ordered_and_tabled_by_bytes(tmp_path):
    records = [rec("full", None, 1.0, "a"),
               rec("compresskv", "64", 1.0, "a", kv_fraction=0.10), rec("compresskv", "64", 0.0, "b", kv_fraction=0.10),
               rec("compresskv", "256", 1.0, "a", kv_fraction=0.14, kv_bits=4),
               rec("compresskv", "256", 1.0, "b", kv_fraction=0.14, kv_bits=4),
               rec("compresskv", "64", 1.0, "a", kv_fraction=0.06, kv_bits=8)]
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [{"settings": {}}, *records]) + "\n")
    loaded = load_records(path)
    assert method_order(loaded) == ["full", "compresskv", "compresskv 8-bit", "compresskv 4-bit"]
    table = bytes_table(loaded, "niah").splitlines()[2:]
    assert [line.split(" | ")[:3] for line in table] == [
        ["| compresskv 8-bit", "64", "6.0"], ["| compresskv", "64", "10.0"], ["| compresskv 4-bit", "256", "14.0"]]
    assert "50.0 [9.5, 90.5]" in table[1]  # 1 of 2, Wilson
    assert "By the KV kept" in write_report(loaded, tmp_path / "plots")
