"""The eval harness over several samples, with methods whose observation windows differ."""

from dataclasses import replace

import mlx.core as mx
import pytest

from ckv_mlx.eval.harness import Harness, Setting
from ckv_mlx.eval.tasks import EvalSample
from ckv_mlx.policy.methods import make_method
from ckv_mlx.engine.session import Session
from fakes import fake_profile
from tiny import TinyTokenizer, plain_greedy, tiny_model


class NumberTokenizer(TinyTokenizer):
    def decode(self, ids):
        return " ".join(map(str, ids))


def sample(key, seed):
    mx.random.seed(seed)
    document, question = mx.random.randint(1, 128, (160,)).tolist(), mx.random.randint(1, 128, (20,)).tolist()
    return EvalSample(key, "niah", 160, document, [question], [lambda text: {"score": 1.0}])


def test_every_sample_runs_every_window_and_full_is_mlx_lm():
    model = tiny_model()
    profile = fake_profile(model)
    profile.defaults = replace(profile.defaults, window=16)
    wide = make_method("compresskv", profile)[0]
    settings = [Setting(make_method("full")[0], None), Setting(make_method("snapkv")[0], "32"), Setting(wide, "48")]
    harness = Harness(Session(model, NumberTokenizer(), wide), NumberTokenizer(), max_tokens=4)
    for key, seed in (("a", 1), ("b", 2)):
        s = sample(key, seed)
        records = list(harness.run(s, settings, ["query-aware", "query-agnostic"], set()))
        assert [r["method"] for r in records] == ["full", "snapkv", "compresskv"] * 2
        assert records[0]["answer"] == NumberTokenizer().decode(plain_greedy(model, s.document + s.questions[0], 4))
        assert all(0 < r["kv_fraction"] < 1 for r in records if r["method"] != "full")


def test_a_stored_document_is_not_read_again_and_gives_the_same_records(tmp_path):
    model = tiny_model()
    settings = [Setting(make_method("full")[0], None), Setting(make_method("snapkv")[0], "32")]
    notes = []
    runs = []
    for _ in range(2):
        harness = Harness(Session(model, NumberTokenizer(), settings[1].method), NumberTokenizer(), max_tokens=4,
                          stores=tmp_path, identity="tiny", notify=notes.append)
        runs.append(list(harness.run(sample("a", 1), settings, ["query-aware", "query-agnostic"], set())))
    assert runs[0] == runs[1]
    assert len(notes) == 1 and notes[0].startswith("a's document was read before: its stored cache")


def test_disk_follow_ups_select_from_the_documents_store_not_a_copy(tmp_path, monkeypatch):
    import ckv_mlx.eval.harness as harness_module

    model = tiny_model()
    settings = [Setting(make_method("snapkv")[0], "32")]
    s = replace(sample("a", 1), task="followup", questions=[[5, 6, 7], [8, 9]], scorers=[lambda t: {"score": 1.0}] * 2)
    runs = {}
    for stores in (None, tmp_path):
        if stores is not None:
            monkeypatch.setattr(harness_module, "_stored", lambda *a: pytest.fail("a second store was written"))
        harness = Harness(Session(model, NumberTokenizer(), settings[0].method), NumberTokenizer(), max_tokens=4,
                          stores=stores, identity="tiny", notify=lambda line: None)
        runs[stores] = list(harness.followups(s, settings, ["per-question", "per-question-disk"], set()))
    assert [r["answer"] for r in runs[None]] == [r["answer"] for r in runs[tmp_path]]
    by_policy = {(r["policy"], r["turn"]): r["answer"] for r in runs[tmp_path]}
    assert by_policy[("per-question", 2)] == by_policy[("per-question-disk", 2)]


class LineTokenizer(NumberTokenizer):
    """Every token a line of its own: an answer's first line is its first token."""

    def decode(self, ids):
        return "".join(f"{i}\n" for i in ids)


def test_a_whole_answer_runs_past_its_first_line_and_is_scored_by_fidelity():
    model = tiny_model()
    method = make_method("snapkv")[0]
    harness = Harness(Session(model, LineTokenizer(), method), LineTokenizer(), max_tokens=2)
    line, whole = sample("line", 3), replace(sample("whole", 3), max_tokens=6, whole_answer=True)
    settings = [Setting(make_method("full")[0], None), Setting(method, "32")]
    cut = list(harness.run(line, settings, ["query-aware"], set()))
    full, kept = harness.run(whole, settings, ["query-aware"], set())
    assert len(cut[0]["answer"].split()) == 1  # the first line only
    assert full["answer"] == LineTokenizer().decode(plain_greedy(model, whole.document + whole.questions[0], 6))
    assert kept["top1"] is not None and kept["kl"] is not None


class WordTokenizer:
    """Words as tokens, for the reading prompts' lengths."""

    def __init__(self):
        self.words: list[str] = []

    def encode(self, text, add_special_tokens=False):
        ids = []
        for word in text.split(" "):
            if word not in self.words:
                self.words.append(word)
            ids.append(self.words.index(word))
        return ids

    def decode(self, ids):
        return " ".join(self.words[i] for i in ids)


@pytest.mark.parametrize("kind", ["manual", "legal"])
def test_reading_documents_are_the_kinds_real_documents_cut_at_the_length(kind):
    from ckv_mlx.eval import reading
    from ckv_mlx.eval.facts import DOCUMENTS

    tokenizer = WordTokenizer()
    text = reading.document_text(kind, 3000, tokenizer)
    first = sorted((DOCUMENTS / kind).glob("*.txt"))[0].read_text(encoding="utf-8")
    assert len(tokenizer.encode(text)) == 3000 and text.startswith(first[:200])
    assert reading.LISTED[kind] in reading.prompt("list", kind)
