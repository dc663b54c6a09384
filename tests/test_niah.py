"""Needle prompts on the real tokenizer: length, depth, sentence boundary, data files."""

import pytest

from ckv_mlx.errors import CKVError
from ckv_mlx.eval.niah import exact_match, load_haystack, load_needles, needle_prompt
from ckv_mlx.text.prompts import render


@pytest.mark.parametrize("style", ["completion", "chat"])
@pytest.mark.parametrize("depth", [0, 40, 100])
def test_needle_sits_at_its_depth_after_a_sentence_end(default_model, style, depth):
    tokenizer = default_model.tokenizer
    needle = load_needles()[1]
    prompt = needle_prompt(tokenizer, load_haystack(), [needle], 800, [depth], style)
    assert abs(len(prompt.tokens) - 800) <= 8
    text = tokenizer.decode(prompt.document)
    at = text.index(needle.needle)
    assert text.count(needle.needle) == 1
    assert abs(at / len(text) - depth / 100) < 0.1
    if 0 < depth < 100:  # moved back to a sentence end; 0 starts the text, 100 is appended
        assert text[:at].rstrip().endswith(".")
    question = "\nBased on the content of the text, Question: " if style == "completion" else "answer the question: "
    full = render(tokenizer, text, tokenizer.decode(prompt.question).lstrip("\n"), style == "completion")
    assert question in tokenizer.decode(prompt.tokens) and len(full) > 0


def test_two_needles_keep_their_order_and_depths(default_model):
    tokenizer = default_model.tokenizer
    first, second = load_needles()[:2]
    prompt = needle_prompt(tokenizer, load_haystack(), [first, second], 1000, [20, 80])
    text = tokenizer.decode(prompt.tokens)
    assert text.index(first.needle) < text.index(second.needle)
    assert first.question in text and second.question not in text


def test_shipped_needles_are_consistent():
    for needle in load_needles():
        assert needle.needle == f"{needle.completion} {needle.real_needle}."
        assert exact_match(f"it is {needle.real_needle}", needle)
        assert not exact_match("I do not know", needle)


def test_bad_data_files_are_one_line_errors(tmp_path):
    bad = tmp_path / "n.jsonl"
    bad.write_text('{"needle": "x"}\n')
    with pytest.raises(CKVError, match=r"line 1: not a needle"):
        load_needles(bad)
    with pytest.raises(CKVError, match="no haystack text"):
        load_haystack(tmp_path)
    with pytest.raises(CKVError, match="cannot read the needles"):
        load_needles(tmp_path / "missing.jsonl")
