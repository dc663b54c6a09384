"""Semantic Retrieval Head identification (method doc, section 1), in MLX.

One trial: a needle prompt, greedy decoding with every layer's attention recorded for
the decode rows only, then per head the semantic retrieval score (attention mass on the
answer span, weighted by how often the emitted token occurs in it) and the classic
retrieval-head score of Wu et al. A trial counts when the answer's ROUGE-1 recall against
the answer span is above 0.5; a head's score is its mean over counted trials.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from ..engine.conversation import answer_line
from ..eval.niah import NeedlePrompt, answer_span, exact_match, rouge1_recall
from ..engine.session import Session
from .taps import SpanRecorder, tapped

ROUGE_GATE = 0.5


def srh_trial(session: Session, tokenizer, prompt: NeedlePrompt, max_tokens: int) -> dict:
    """Run one needle prompt; the record holds the answer and both per-head scores."""
    tokens = prompt.tokens
    target = tokenizer.encode(" " + prompt.needle.real_needle.strip(), add_special_tokens=False)
    span = answer_span(tokens, target)
    record = {"prompt_tokens": len(tokens), "span": None, "answer": "", "rouge1": 0.0, "counted": False}
    if span is None:
        return record
    session.reset()
    if len(tokens) > 1:
        session.feed(tokens[:-1])
    recorders = [SpanRecorder(span) for _ in session.attentions]
    with tapped(session.attentions, recorders):
        logits = session.feed(tokens[-1:])
        generated = answer_line(session.generate(logits, max_tokens), tokenizer, max_tokens)
    answer = tokenizer.decode(generated)
    rouge = rouge1_recall(answer, prompt.needle.real_needle)
    record.update(span=[span.start, span.stop], answer=answer, rouge1=rouge)
    if not generated:
        return record
    srh, retrieval = head_scores(recorders, tokens, span, generated)
    record.update(
        exact=exact_match(answer, prompt.needle), counted=rouge > ROUGE_GATE,
        srh=_rounded(srh), retrieval=_rounded(retrieval),
    )
    return record


def head_scores(recorders, tokens, span: range, generated: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """``[layers, heads]`` semantic retrieval and classic retrieval scores of one trial."""
    steps = len(generated)
    mass = np.array(mx.stack([mx.stack(r.mass[:steps]) for r in recorders]))  # [L, T, H]
    top = np.array(mx.stack([mx.stack(r.argmax[:steps]) for r in recorders]))
    span_tokens = np.array(tokens[span.start : span.stop])
    occurs = np.array([(span_tokens == y).sum() for y in generated], dtype=np.float64)
    srh = np.einsum("t,lth->lh", occurs, mass)
    prompt = np.array(tokens)
    in_span = (top >= span.start) & (top < span.stop)
    copied = prompt[np.minimum(top, len(prompt) - 1)] == np.array(generated)[None, :, None]
    retrieval = (in_span & copied).sum(axis=1) / len(span)
    return srh, retrieval


def _rounded(scores: np.ndarray) -> list[list[float]]:
    return np.round(scores, 6).tolist()


def mean_scores(records: list[dict], field: str, shape: tuple[int, int]) -> tuple[np.ndarray, int]:
    """Each head's mean ``field`` score over the counted trials, and how many counted."""
    counted = [np.array(r[field]) for r in records if r.get("counted")]
    if not counted:
        return np.zeros(shape), 0
    return np.mean(counted, axis=0), len(counted)


def rank_heads(scores: np.ndarray) -> tuple[list[list[int]], list[list[float]]]:
    """Per layer, head ids best first (ties: lower id first) and their scores."""
    order = np.argsort(-scores, axis=1, kind="stable")
    ranked = np.take_along_axis(scores, order, axis=1)
    return order.tolist(), np.round(ranked, 6).tolist()
