"""RULER-style samples, checked by re-reading each context independently."""

import re
from collections import Counter

import pytest

from ckv_mlx.eval.ruler import TASKS, Sample, make_sample, score

NOISE = {"The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
         "There and back again."}
NEEDLE = re.compile(r"One of the special magic numbers for (\w+) is: (\d+)\.")
VAR = re.compile(r"VAR ([A-Z]{5}) = (?:VAR ([A-Z]{5})|(\d+))\.")
SEEDS = range(8)


def sentences(context: str) -> list[str]:
    return re.split(r"(?<=\.) ", context)


def asked_key(question: str) -> str:
    return re.search(r"magic numbers? for (\w+) mentioned", question).group(1)


@pytest.mark.parametrize("seed", SEEDS)
def test_multikey_answer_is_the_asked_keys_number(seed):
    s = make_sample("multikey", seed, 400)
    needles = NEEDLE.findall(s.context)
    keys = [k for k, _ in needles]
    assert len(needles) == 4 and len(set(keys)) == 4
    key = asked_key(s.question)
    assert key in s.completion
    assert s.answers == (dict(needles)[key],) and len(s.answers[0]) == 7


@pytest.mark.parametrize("seed", SEEDS)
def test_multivalue_answers_are_all_numbers_of_the_key(seed):
    s = make_sample("multivalue", seed, 400)
    needles = NEEDLE.findall(s.context)
    assert {k for k, _ in needles} == {asked_key(s.question)}
    values = [v for _, v in needles]
    assert len(values) == 4 and len(set(values)) == 4
    assert sorted(s.answers) == sorted(values)


@pytest.mark.parametrize("task", ["multikey", "multivalue", "variable-tracking"])
def test_statements_sit_between_noise_sentences(task):
    s = make_sample(task, 3, 500)
    parts = sentences(s.context)
    other = [p for p in parts if p not in NOISE]
    assert all(NEEDLE.fullmatch(p) or VAR.fullmatch(p) for p in other)
    assert len(other) == (10 if task == "variable-tracking" else 4)
    assert len(parts) - len(other) > 50


def resolve(context: str) -> dict[str, str]:
    """Each variable's value, following the VAR assignments of the context."""
    assigned = {}
    for name, source, value in VAR.findall(context):
        assert name not in assigned
        assigned[name] = source or value
    values = {}
    for name in assigned:
        target, hops = name, 0
        while target in assigned:
            target, hops = assigned[target], hops + 1
            assert hops <= len(assigned)
        values[name] = target
    return values


@pytest.mark.parametrize("seed", SEEDS)
def test_variable_tracking_answers_are_the_resolved_chain(seed):
    s = make_sample("variable-tracking", seed, 400)
    value = re.search(r"assigned the value (\d+)", s.question).group(1)
    values = resolve(s.context)
    chain = {name for name, v in values.items() if v == value}
    assert set(s.answers) == chain and len(chain) == 5
    hops = [n for n, src, _ in VAR.findall(s.context) if src and n in chain]
    assert len(hops) == 4
    distractors = Counter(v for v in values.values() if v != value)
    assert list(distractors.values()) == [5]


def test_variable_tracking_chain_is_stated_in_order():
    s = make_sample("variable-tracking", 5, 300)
    position = {name: s.context.index(f"VAR {name} =") for name in s.answers}
    for name, source, _ in VAR.findall(s.context):
        if source:
            assert position.get(source, -1) < s.context.index(f"VAR {name} =")


@pytest.mark.parametrize("words", [100, 137, 1000, 6000])
@pytest.mark.parametrize("seed", SEEDS)
def test_frequent_words_top_three_are_the_answers(seed, words):
    s = make_sample("frequent-words", seed, words)
    ranked = Counter(s.context.split()).most_common()
    assert {w for w, _ in ranked[:3]} == set(s.answers)
    assert ranked[2][1] > ranked[3][1]
    assert len(ranked) > 5


def test_determinism():
    for task in TASKS:
        assert make_sample(task, 1, 300) == make_sample(task, 1, 300)
        assert make_sample(task, 1, 300) != make_sample(task, 2, 300)
        assert make_sample(task, 1, 300).context != make_sample(task, 1, 301).context


def test_answers_vary_with_the_seed():
    for task in TASKS:
        assert len({make_sample(task, seed, 300).answers for seed in SEEDS}) > 1


@pytest.mark.parametrize("words", [100, 137, 1000, 7000])
@pytest.mark.parametrize("task", TASKS)
def test_context_length(task, words):
    for seed in range(3):
        count = len(make_sample(task, seed, words).context.split())
        assert abs(count - words) <= 0.15 * words


def test_sample_fields():
    for task in TASKS:
        s = make_sample(task, 0, 200)
        assert s.task == task and s.question.endswith(("?", ".")) and s.completion
        assert all(a and a not in s.question + s.completion for a in s.answers)


def sample(*answers):
    return Sample("multivalue", "", "", "", answers)


def test_score():
    s = sample("1111111", "2222222", "3333333", "4444444")
    assert score("1111111, 2222222, 3333333 and 4444444.", s) == 1.0
    assert score("2222222 and 4444444", s) == 0.5
    assert score("4444444", s) == 0.25
    assert score("I do not know.", s) == 0.0
    assert score("", s) == 0.0
    assert score("they are abcde and FGHIJ", sample("ABCDE", "fghij")) == 1.0


def test_score_against_a_real_sample():
    s = make_sample("variable-tracking", 0, 300)
    assert score(" ".join(s.answers), s) == 1.0
    assert score(" ".join(s.answers[:2]).lower(), s) == pytest.approx(0.4)


def test_unknown_task():
    with pytest.raises(ValueError) as info:
        make_sample("niah", 0, 1000)
    message = str(info.value)
    assert "'niah'" in message and "\n" not in message
    assert all(task in message for task in TASKS)


@pytest.mark.parametrize("task", TASKS)
def test_too_few_words(task):
    with pytest.raises(ValueError, match=r"at least 100 words.*got 99") as info:
        make_sample(task, 0, 99)
    assert task in str(info.value) and "\n" not in str(info.value)
    make_sample(task, 0, 100)
