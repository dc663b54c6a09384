"""Multi-turn policies against plain mlx-lm and against a fresh prefill of the same tokens."""

import mlx.core as mx
import pytest

from ckv_mlx.engine.conversation import Conversation
from ckv_mlx.errors import CKVError
from ckv_mlx.policy.methods import make_method
from ckv_mlx.engine.session import Session
from fakes import fake_profile
from tiny import TinyTokenizer, plain_greedy, tiny_model

mx.random.seed(7)
DOC = mx.random.randint(1, 128, (150,)).tolist()
Q1, Q2 = [5, 6, 7, 8], [9, 10, 11]


def two_turns(policy, method_name, budget, n=5):
    model = tiny_model("llama", layers=2)
    session = Session(model, TinyTokenizer(), make_method(method_name, fake_profile(model))[0], region=16)
    session.feed(DOC)
    conversation = Conversation(session, policy, budget)
    conversation.open(session.snapshot())
    first = list(conversation.ask(Q1, n))
    second = list(conversation.ask(Q2, n))
    return model, session, first, second


@pytest.mark.parametrize("policy", ["first-question", "agnostic", "per-question"])
def test_full_cache_follow_up_matches_plain_mlx_lm(policy):
    model, _, first, second = two_turns(policy, "full", None)
    assert first == plain_greedy(model, DOC + Q1, 5)
    assert second == plain_greedy(model, DOC + Q1 + first + Q2, 5)


def test_per_question_recompresses_the_whole_conversation_from_the_full_cache():
    model, session, first, second = two_turns("per-question", "snapkv", 40)
    fresh = Session(model, TinyTokenizer(), make_method("snapkv")[0], region=16)
    logits = fresh.feed(DOC + Q1 + first + Q2)
    fresh.compress(40)
    assert second == list(fresh.generate(logits, 5))
    assert not session.compressed  # back on the full cache, answer included
    assert session.position == len(DOC + Q1 + first + Q2 + second)


def test_first_question_compresses_once_and_stays_bounded():
    _, session, first, second = two_turns("first-question", "snapkv", 40, n=30)
    per_row = session.caches[0].nbytes // session.caches[0].length
    assert session.compressed
    assert all(c.length <= 40 + 16 for c in session.caches)
    assert session.position == len(DOC + Q1 + first + Q2 + second)
    assert session.kv_bytes <= (40 + 16) * per_row * len(session.caches)


def test_stopping_early_keeps_every_shown_token_in_the_cache():
    model = tiny_model("llama", layers=2)
    session = Session(model, TinyTokenizer(), make_method("snapkv")[0], region=16)
    session.feed(DOC)
    conversation = Conversation(session, "first-question", 40)
    conversation.open(session.snapshot())
    stream = conversation.ask(Q1, 10)
    shown = [next(stream), next(stream)]
    stream.close()
    assert session.position == len(DOC + Q1) + len(shown)
    assert session.consistent


def test_unknown_policy_is_refused():
    with pytest.raises(CKVError, match="unknown policy 'later'.*first-question"):
        Conversation(None, "later", 10)


@pytest.mark.parametrize("method_name, budget", [("full", None), ("snapkv", 40)])
def test_teacher_force_gives_the_log_probs_of_plain_mlx_lm_on_the_same_cache(method_name, budget):
    model = tiny_model("llama", layers=2)
    session = Session(model, TinyTokenizer(), make_method(method_name)[0], region=16)
    logits = session.feed(DOC)
    session.compress(budget)
    forced = mx.random.randint(1, 128, (40,)).tolist()  # longer than the region: evicts on the way
    state = session.snapshot()
    ours = session.teacher_force(logits, forced)
    session.restore(state)
    expected = [logits]
    for token in forced[:-1]:
        session.make_room(1)
        expected.append(model(mx.array([[token]]), cache=session.model_caches())[:, -1])
    expected = mx.concatenate(expected)
    expected = expected - mx.logsumexp(expected, axis=-1, keepdims=True)
    assert ours.shape == (40, 128)
    assert mx.allclose(ours, expected, atol=1e-4).item()
