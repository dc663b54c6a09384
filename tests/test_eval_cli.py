"""`python -m ckv_mlx.eval` on the real default model: a small sweep, checked against plain mlx-lm."""

import json

import pytest

from ckv_mlx.eval.__main__ import main
from ckv_mlx.eval.niah import load_haystack, load_needles, needle_prompt
from tiny import plain_greedy

pytestmark = pytest.mark.slow

METHODS = "full,compresskv,streamingllm"
ARGS = ["--tasks", "niah,multikey,followup", "--lengths", "300", "--depths", "50", "--needle-count", "1",
        "--samples", "1", "--budgets", "32,20%", "--methods", METHODS, "--max-tokens", "6"]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, default_model):
    out = tmp_path_factory.mktemp("eval")
    code = main([*ARGS, "--out", str(out)])
    records = [json.loads(l) for l in (out / "records.jsonl").read_text().splitlines()[1:]]
    return code, out, records


def test_every_setting_has_a_record(evaluated):
    code, _, records = evaluated
    assert code == 0
    single = [r for r in records if r["task"] != "followup"]
    # 2 samples x 2 modes x (full + 2 methods x 2 budgets)
    assert len(single) == 2 * 2 * 5
    follow = [r for r in records if r["task"] == "followup"]
    assert len(follow) == 4 * 5 * 2  # policies x settings x turns
    assert {r["policy"] for r in follow} == {"first-question", "agnostic", "per-question", "per-question-disk"}


def test_on_disk_follow_ups_answer_as_in_memory_holding_less(evaluated):
    _, _, records = evaluated
    follow = {(r["method"], r["budget"], r["turn"], r["policy"]): r for r in records if r["task"] == "followup"}
    for (method, budget, turn, policy), disk in follow.items():
        if policy != "per-question-disk":
            continue
        memory = follow[(method, budget, turn, "per-question")]
        assert disk["answer"] == memory["answer"]
        if method != "full":
            assert disk["kv_ram_bytes"] < memory["kv_ram_bytes"]


def test_full_answer_is_plain_mlx_lm_greedy(evaluated, default_model):
    _, _, records = evaluated
    loaded = default_model
    needle = load_needles()[0]
    prompt = needle_prompt(loaded.tokenizer, load_haystack(), [needle], 300, [50])
    expected = loaded.tokenizer.decode(plain_greedy(loaded.model, prompt.tokens, 6))
    full = next(r for r in records if r["task"] == "niah" and r["method"] == "full")
    assert expected.startswith(full["answer"]) and full["answer"]
    assert full["prompt_tokens"] == len(prompt.tokens)


def test_fractions_and_fidelity(evaluated):
    _, _, records = evaluated
    for r in records:
        if r["task"] == "followup":
            continue
        if r["method"] == "full":
            assert r["kv_fraction"] == 1.0 and r["top1"] is None
        else:
            assert 0 < r["kv_fraction"] < 1
            assert 0 <= r["top1"] <= 1 and r["kl"] >= 0
            if r["budget"] == "20%":
                assert r["budget_tokens"] == round(0.2 * r["prompt_tokens"])
    per_question = [r for r in records if r.get("policy") == "per-question" and r["method"] != "full"]
    assert all(r["kv_fraction"] == 1.0 for r in per_question)  # it keeps the full cache


def test_report_and_plots(evaluated):
    _, out, _ = evaluated
    report = (out / "report.md").read_text()
    assert "ckv_mlx.eval" in report and "| compresskv |" in report
    assert (out / "niah-query-aware-streamingllm-32.png").stat().st_size > 0
    assert (out / "niah-query-agnostic-compresskv-20pct.png").exists()
    assert (out / "niah-query-aware-summary.png").exists()


def test_rerun_adds_nothing_and_a_bigger_grid_adds_only_the_new(evaluated, capsys):
    _, out, records = evaluated
    assert main([*ARGS, "--out", str(out)]) == 0
    again = [json.loads(l) for l in (out / "records.jsonl").read_text().splitlines()[1:]]
    assert again == records
    bigger = [*ARGS, "--out", str(out)]
    bigger[bigger.index("--budgets") + 1] = "32,20%,64"
    bigger[bigger.index("--tasks") + 1] = "niah"
    assert main(bigger) == 0
    grown = [json.loads(l) for l in (out / "records.jsonl").read_text().splitlines()[1:]]
    assert grown[: len(records)] == records
    assert len(grown) - len(records) == 2 * 2  # 2 modes x 2 methods at the new budget


def test_bad_input_is_one_line(tmp_path, capsys, default_model):
    assert main(["--tasks", "niah,poetry", "--out", str(tmp_path)]) == 2
    assert "unknown task poetry" in capsys.readouterr().err
    assert main(["--budgets", "64,lots", "--out", str(tmp_path)]) == 2
    assert "budget 'lots' is not understood" in capsys.readouterr().err
    assert main(["--lengths", "9000", "--out", str(tmp_path)]) == 2
    assert "exceeds the model's context" in capsys.readouterr().err
    assert main(["--tasks", "facts", "--kinds", "essays", "--out", str(tmp_path)]) == 2
    assert "needs --essays DIR" in capsys.readouterr().err
    assert main(["--tasks", "facts", "--kinds", "poems", "--out", str(tmp_path)]) == 2
    assert "unknown kind poems" in capsys.readouterr().err
    assert main(["--methods", "snapkv+kernel4", "--out", str(tmp_path)]) == 2
    assert "kernel must be odd" in capsys.readouterr().err


def test_bounded_prefill_grid(tmp_path, default_model):
    args = ["--tasks", "niah", "--lengths", "300", "--depths", "50", "--needle-count", "1", "--methods", "snapkv",
            "--budgets", "32,64", "--modes", "query-aware,query-agnostic", "--max-tokens", "4", "--no-fidelity",
            "--working-budget", "96", "--prefill-chunk", "64", "--out", str(tmp_path)]
    assert main(args) == 0
    records = [json.loads(l) for l in (tmp_path / "records.jsonl").read_text().splitlines()]
    identity, records = records[0], records[1:]
    assert "working budget 96, chunks scored by the question" in json.dumps(identity)
    agnostic = [r for r in records if r["mode"] == "query-agnostic"]
    assert {r.get("chunk_scoring") for r in agnostic} == {None, "window"}  # the question comes too late
    records = [r for r in records if r["mode"] == "query-aware"]
    assert {r.get("chunk_scoring") for r in records} == {None, "question"}
    assert [(r["method"], r.get("working_budget")) for r in records] == [("full", None), ("snapkv", 96), ("snapkv", 96)]
    full, at32, at64 = (r["kv_fraction"] for r in records)
    full_rows = -(-records[0]["prompt_tokens"] // 256) * 256  # a full cache allocates 256-row steps
    assert full == 1 and at32 == pytest.approx((32 + 8) / full_rows, abs=1e-9)  # budget + a region of 8 rows
    assert at64 == pytest.approx((64 + 16) / full_rows, abs=1e-9)  # a region of a quarter of 64


def test_working_budget_below_a_budget_is_refused(tmp_path, capsys, default_model):
    assert main(["--working-budget", "32", "--budgets", "64", "--out", str(tmp_path)]) == 2
    assert "--working-budget 32 must be at least every budget" in capsys.readouterr().err


def test_a_kv_bits_grid_records_each_bits_with_its_bytes(tmp_path, capsys, default_model):
    args = ["--tasks", "niah", "--lengths", "300", "--depths", "50", "--needle-count", "1", "--methods", "snapkv",
            "--budgets", "64", "--kv-bits", "16,8,4", "--modes", "query-aware", "--max-tokens", "4", "--out", str(tmp_path)]
    assert main(args) == 0
    records = [json.loads(l) for l in (tmp_path / "records.jsonl").read_text().splitlines()[1:]]
    assert [(r["method"], r["kv_bits"]) for r in records] == [("full", None), ("snapkv", None), ("snapkv", 8),
                                                                ("snapkv", 4)]
    full, plain, eight, four = records
    row, full_rows = 30 * 3 * 64 * 2 * 4, -(-full["prompt_tokens"] // 256) * 256  # float32: 30 layers, 3 KV heads x 64
    packed = {bits: 30 * 2 * 3 * (64 * bits // 8 + 2 * 4) for bits in (8, 4)}  # keys and values, a float32 scale and bias
    assert plain["kv_bytes"] == (64 + 16) * row and plain["kv_fraction"] == pytest.approx(80 / full_rows)
    for record, bits in ((eight, 8), (four, 4)):
        assert record["kv_bytes"] == 64 * packed[bits] + 16 * row and record["key"].endswith(f"/{bits}bit-g64")
        assert record["top1"] is not None
    assert "snapkv 4-bit" in (tmp_path / "report.md").read_text()
    assert main([*args[:-2], "--kv-bits", "16,3", "--out", str(tmp_path / "bad")]) == 2
    assert "--kv-bits 3: use 16" in capsys.readouterr().err


def test_reading_fidelity_alone_measures_the_same_without_answers(tmp_path, default_model):
    from ckv_mlx.eval.reading import ANSWER_TOKENS, document_text, prompt
    from ckv_mlx.text.prompts import split_prompt

    args = ["--tasks", "list", "--kinds", "code", "--lengths", "300", "--methods", "snapkv", "--budgets", "32",
            "--modes", "query-aware"]
    runs = []
    for extra, out in (([], tmp_path / "answers"), (["--fidelity-only"], tmp_path / "alone")):
        assert main([*args, *extra, "--out", str(out)]) == 0
        runs.append([json.loads(l) for l in (out / "records.jsonl").read_text().splitlines()[1:]])
    (full, snapkv), (full_alone, snapkv_alone) = runs
    tokenizer = default_model.tokenizer
    document, question = split_prompt(tokenizer, document_text("code", 300, tokenizer), prompt("list", "code"), True)
    expected = tokenizer.decode(plain_greedy(default_model.model, document + question, ANSWER_TOKENS))
    assert full["answer"] == full_alone["answer"] == expected  # the whole answer, past its first line
    assert snapkv["answer"] and snapkv_alone["answer"] == ""
    assert (snapkv_alone["top1"], snapkv_alone["kl"]) == (snapkv["top1"], snapkv["kl"])
    assert 0 <= snapkv["top1"] <= 1 and snapkv["kl"] >= 0


def test_fidelity_alone_is_only_for_reading_tasks(tmp_path, capsys, default_model):
    assert main(["--tasks", "niah", "--fidelity-only", "--out", str(tmp_path)]) == 2
    assert "--fidelity-only scores summary and list by fidelity alone" in capsys.readouterr().err
