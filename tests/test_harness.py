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
