"""Layer eviction errors (method doc, section 3), in MLX.

One prompt: prefill with a full cache, pick each layer's budget-32 SRH selection once,
then decode greedily; at every step each layer's output over only the selected rows
(plus everything generated) is compared with its full output, both after ``o_proj``.
The full output is passed on, so each layer's error is measured in isolation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..engine.conversation import answer_line
from ..errors import CKVError, read_jsonl
from ..eval.ruler import TASKS, make_sample
from ..policy.methods import Method
from ..engine.session import Session
from .taps import LayerError, tapped

REDUCTIONS = ("sum", "mean")


@dataclass(frozen=True)
class LongPrompt:
    """A long-context question; ``dataset`` groups prompts for normalisation."""

    key: str
    dataset: str
    context: str
    question: str

    def text(self) -> str:
        return f"{self.context}\n\nQuestion: {self.question}\nAnswer:"


def default_prompts(words: int, per_task: int = 2) -> list[LongPrompt]:
    """The shipped set: RULER-style synthetic QA, ``per_task`` prompts of each task."""
    prompts = []
    for task in TASKS:
        for seed in range(per_task):
            s = make_sample(task, seed, words)
            question = f"{s.question}\nAnswer: {s.completion}".removesuffix("\nAnswer: ")
            prompts.append(LongPrompt(f"{task}/{seed}", task, s.context, question))
    return prompts


def load_prompts(path: str | Path) -> list[LongPrompt]:
    """Prompts from a JSONL of ``{"context", "question"}`` (optional ``"dataset"``)."""
    path = Path(path)
    prompts = []
    for number, row in read_jsonl(path, "prompts"):
        try:
            prompts.append(LongPrompt(f"{path.name}/{number}", str(row.get("dataset", path.stem)),
                                      str(row["context"]), str(row["question"])))
        except (KeyError, TypeError, AttributeError):
            raise CKVError(f'{path}, line {number}: needs a JSON object with "context" and "question"') from None
    return prompts


def layer_trial(
    session: Session, tokenizer, tokens: list[int], method: Method, budget: int, max_tokens: int, reduce: str
) -> dict:
    """One prompt's per-layer error (summed or averaged over its decode steps)."""
    session.reset()
    logits = session.feed(tokens)
    taps = []
    for layer, (attention, cache) in enumerate(zip(session.attentions, session.caches)):
        keys = cache.keys_and_values()[0][0]
        keep = method.keep_indices(layer, attention.window_queries, keys, attention.scale, budget, attention.sinks)
        taps.append(LayerError(keep, len(tokens)))
    with tapped(session.attentions, taps):
        generated = answer_line(session.generate(logits, max_tokens), tokenizer, max_tokens)
    steps = min(len(t.errors) for t in taps)
    if steps == 0:
        return {"errors": None, "steps": 0, "answer": tokenizer.decode(generated)}
    per_step = np.array(mx.stack([mx.stack(t.errors[:steps]) for t in taps]))  # [L, steps] float32
    errors = per_step.sum(axis=1) if reduce == "sum" else per_step.mean(axis=1)
    if not np.isfinite(errors).all():  # never into the run log: save_profile would refuse it later
        raise CKVError(f"a layer error is not finite ({errors.tolist()}): the model overflows in its dtype; "
                       "profile it in float32 (CKV_PRECISION=float32)")
    return {"errors": np.round(errors, 8).tolist(), "steps": steps, "answer": tokenizer.decode(generated)}


def layer_errors(records: list[dict]) -> list[float]:
    """Sum per dataset, L1-normalise each, average over datasets, renormalise to 1."""
    by_dataset: dict[str, list[np.ndarray]] = {}
    for r in records:
        if r.get("errors"):
            by_dataset.setdefault(r["dataset"], []).append(np.array(r["errors"], dtype=np.float64))
    if not by_dataset:
        raise CKVError("no prompt produced a decode step: nothing to measure layer errors from")
    shares = []
    for vectors in by_dataset.values():
        total = np.sum(vectors, axis=0)
        shares.append(total / total.sum())
    mean = np.mean(shares, axis=0)
    return (mean / mean.sum()).tolist()
