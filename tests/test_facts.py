"""Exact-fact samples, checked by re-reading each prompt independently with regular
expressions; their scoring and their report from hand-made records."""

import re
from pathlib import Path

import pytest

from ckv_mlx.errors import CKVError
from ckv_mlx.eval import facts
from ckv_mlx.eval.facts_report import agreement, budget_table, matching_budget
from ckv_mlx.eval.tasks import fact_samples

ESSAYS = Path(__file__).resolve().parents[2] / "shared" / "reference" / "compresskv" / "haystack" / "paul_graham_essays"
NEEDLE = re.compile(r"One of the special magic (number|UUID|name|code)s for ([a-z]+-[a-z]+) is: (.+?)\.(?=\s|$)")
FORM_VALUES = {
    "number5": r"[1-9]\d{4}", "number7": r"[1-9]\d{6}",
    "uuid": r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}",
    "name": r"[A-Z][a-z]+ [A-Z][a-z]+", "code": r"[A-Z]{2}-\d{4}-[A-Z]{2}",
}
SYNTHETIC = ["noise", "distractors", "manual", "code", "legal", "financial"]


class ByteTokenizer:
    """One token per byte: what a prompt says is exactly its bytes."""

    def encode(self, text, add_special_tokens=True):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


def prompts(kinds, forms, split="dev", length=3000, per_cell=2, essays=None):
    tokenizer = ByteTokenizer()
    for s in fact_samples(tokenizer, kinds, forms, split, [length], per_cell, essays):
        yield s, tokenizer.decode(s.document), tokenizer.decode(s.questions[0])


@pytest.mark.parametrize("kind", SYNTHETIC)
def test_the_asked_needle_is_in_the_document_once_with_its_value_of_its_form(kind):
    for sample, document, question in prompts([kind], list(facts.FORMS)):
        key = re.search(r"magic \w+ for ([a-z]+-[a-z]+) mentioned", question).group(1)
        mine = [n for n in NEEDLE.findall(document) if n[1] == key]
        assert len(mine) == 1, sample.key
        noun, _, value = mine[0]
        assert value == sample.info["value"]
        assert re.fullmatch(FORM_VALUES[sample.info["form"]], value)
        assert noun == facts.NOUNS[sample.info["form"]]
        assert question.rstrip().endswith(f"The special magic {noun} for {key} mentioned in the provided text is")
        assert sample.max_tokens == len(ByteTokenizer().encode(" " + value)) + facts.ANSWER_SLACK


def test_distractors_are_needles_of_the_same_form_for_other_keys():
    for sample, document, _ in prompts(["distractors"], ["number7", "uuid"]):
        lines = [l.strip() for l in document.strip().split("\n")[1:-1]]  # the first and last may be cut
        found = [NEEDLE.fullmatch(l) for l in lines]
        assert all(found) and len(found) > 20
        assert {m.group(1) for m in found} == {facts.NOUNS[sample.info["form"]]}
        assert all(re.fullmatch(FORM_VALUES[sample.info["form"]], m.group(3)) for m in found)


@pytest.mark.parametrize("kind", ["code", "distractors"])
def test_needles_in_code_and_among_distractors_stand_on_a_line_of_their_own(kind):
    for sample, document, _ in prompts([kind], ["code"]):
        line = next(l for l in document.split("\n") if sample.info["value"] in l)
        assert NEEDLE.fullmatch(line), line


@pytest.mark.parametrize("kind", ["code", "distractors"])
def test_a_line_needle_at_the_end_still_stands_on_its_own_line(kind, monkeypatch):
    monkeypatch.setattr(facts, "DEPTHS", (100,))
    for sample, document, _ in prompts([kind], ["code", "number7"]):
        assert sample.depth == 100
        line = next(l for l in document.split("\n") if sample.info["value"] in l)
        assert NEEDLE.fullmatch(line), line


@pytest.mark.parametrize("form", ["name", "number5"])
def test_no_distractor_carries_the_asked_value(form):
    for sample, document, _ in prompts(["distractors"], [form], length=28_000, per_cell=6):
        assert document.count(sample.info["value"]) == 1, sample.key


@pytest.mark.parametrize("kind", ["manual", "legal", "financial", "noise"])
def test_needles_in_prose_follow_a_sentence_end(kind):
    for sample, document, _ in prompts([kind], ["name"]):
        at = document.index("One of the special magic")
        appended = sample.depth == 100 and document.rstrip().endswith(sample.info["value"] + ".")  # as the reference
        assert at == 0 or appended or document[:at].rstrip().endswith("."), sample.key
        assert document[at - 1 : at].isspace() or at == 0


@pytest.mark.parametrize("kind", facts.REAL_KINDS)
def test_dev_and_held_out_share_no_document_and_use_all(kind):
    dev, held = facts.documents(kind, "dev"), facts.documents(kind, "held-out")
    assert dev and held and not set(dev) & set(held)
    assert sorted(dev + held) == sorted((facts.DOCUMENTS / kind).glob("*.txt"))
    used = {s.info["document"] for s, _, _ in prompts([kind], list(facts.FORMS), "held-out", per_cell=1)}
    assert used == {p.stem for p in held}


def test_splits_differ_in_values_and_a_sample_is_the_same_every_time():
    dev = [s.info["value"] for s, _, _ in prompts(["noise"], ["number7"], "dev", per_cell=4)]
    held = [s.info["value"] for s, _, _ in prompts(["noise"], ["number7"], "held-out", per_cell=4)]
    assert not set(dev) & set(held)
    assert dev == [s.info["value"] for s, _, _ in prompts(["noise"], ["number7"], "dev", per_cell=4)]


@pytest.mark.skipif(not ESSAYS.is_dir(), reason="the paper's essays are in ../shared (CI has it; a clone may not)")
def test_essays_split_by_file():
    dev, held = facts.documents("essays", "dev", ESSAYS), facts.documents("essays", "held-out", ESSAYS)
    assert not set(dev) & set(held) and len(dev) + len(held) == len(list(ESSAYS.glob("*.txt")))
    for sample, _, _ in prompts(["essays"], ["name"], "held-out", per_cell=2, essays=ESSAYS):
        assert set(sample.info["document"].split("+")) <= {p.stem for p in held}


@pytest.mark.parametrize("call, words", [
    (lambda: facts.make_fact("poems", "uuid", "dev", 0), "unknown haystack kind"),
    (lambda: facts.make_fact("noise", "phone", "dev", 0), "unknown fact form"),
    (lambda: facts.make_fact("noise", "uuid", "test", 0), "unknown split"),
    (lambda: facts.make_fact("essays", "uuid", "dev", 0), "--essays"),
])
def test_bad_choices_are_one_line(call, words):
    with pytest.raises(CKVError) as info:
        call()
    assert words in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("answer, value, expected", [
    (" 92813.", "92813", True), (' "92813".', "92813", True), (" 9281", "92813", False),
    (" 928131.", "92813", False), (" 192813", "92813", False), (" QX-4821-KP", "qx-4821-kp", True),
    (" Helena Marshall", "Helena Marsh", False), (" 9f1c-ab", "9F1C-AB", True),
])
def test_exact_match_needs_the_whole_value(answer, value, expected):
    assert facts.exact(answer, value) is expected
    assert facts.score(answer, value)["score"] == float(expected)


def record(sample, method, budget, score, kind="code"):
    return {"task": "facts", "mode": "query-aware", "sample": sample, "method": method, "budget": budget,
            "score": score, "kind": kind, "split": "dev", "kv_fraction": 0.1}


def test_agreement_counts_only_what_the_full_cache_answers():
    records = [record(s, "full", None, f) for s, f in (("a", 1), ("b", 1), ("c", 0))]
    records += [record(s, "snapkv", "64", m) for s, m in (("a", 1), ("b", 0), ("c", 1))]
    records += [record(s, "snapkv", "128", 1) for s in "abc"]
    assert agreement(records, "snapkv", "64") == (1, 2)
    assert agreement(records, "snapkv", "128") == (2, 2)
    assert matching_budget(records, "snapkv") == "128 (2/2)"
    assert matching_budget([r for r in records if r["budget"] != "128"], "snapkv") == "none to 64"
    assert matching_budget([dict(r, score=0) if r["method"] == "full" else r for r in records], "snapkv") == "-"


def test_budget_table_has_a_column_per_kind_and_all():
    records = [record("a", "full", None, 1, "code"), record("a", "snapkv", "64", 1, "code"),
               record("b", "full", None, 1, "legal"), record("b", "snapkv", "64", 0, "legal")]
    table = budget_table(records, "query-aware")
    assert "| method | code | legal | all kinds |" in table
    assert "| snapkv | 64 (1/1) | none to 64 | none to 64 |" in table
