"""One rank of a group for ``tests/test_group.py``, started by ``mlx.launch`` (or called in
the test's own process as the one-process reference): a tiny model folder split over the
group reads one prompt with every method at each budget, and writes what each layer kept
and what was generated."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

PROMPT = [int(t) for t in np.random.RandomState(0).randint(1, 2000, 300)]
ANSWER = 8  # greedy tokens


def run(folder: str, methods: list[str], budgets: list[int], out: Path, pipeline: bool = False,
        precision: str = "float32", profile: str | None = None) -> None:
    """Write ``out/rank<r>.json`` (tokens, bytes, placement) and ``out/rank<r>.npz`` (each
    held layer's kept keys, by method, budget and layer number)."""
    from ckv_mlx import make_prompt_cache
    from ckv_mlx.engine.session import Session
    from ckv_mlx.errors import CKVError
    from ckv_mlx.model.models import load_model
    from ckv_mlx.policy.methods import make_method
    from ckv_mlx.profiles import load_profile

    loaded = load_model(folder, precision, identify=False, pipeline=pipeline)
    chosen = load_profile(profile) if profile else None
    record, kept = {}, {}
    try:  # the mlx-lm building block compresses a model held whole only
        make_prompt_cache(loaded.model, method="snapkv")
        refused = None
    except CKVError as error:
        refused = str(error)
    for name in methods:
        method, _ = make_method(name, chosen)
        session = Session(loaded.model, loaded.tokenizer, method)
        for budget in budgets:
            session.reset()
            logits = session.prefill(PROMPT)
            session.compress(budget if method.compresses else None)
            for layer, cache in zip(session.placement.layers, session.caches):
                kept[f"{name}/{budget}/{layer}"] = np.array(cache.keys_and_values()[0].astype(mx.float32))
            record[f"{name}/{budget}"] = {
                "kv_bytes": session.kv_bytes, "budgets": session.stats.layer_budgets,
                "tokens": list(session.generate(logits, ANSWER))}
    rank = mx.distributed.init().rank()
    heads = session.heads
    meta = {"layers": list(session.placement.layers), "first_kv": heads.first_kv if heads else 0, "runs": record,
            "make_prompt_cache_refused": refused}
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / f"rank{rank}.npz", **kept)
    (out / f"rank{rank}.json").write_text(json.dumps(meta))




def chat(folder: str, document: str, questions: list[str], out: Path, pipeline: bool = False) -> None:
    """Rank 0 chats about ``document`` with ``ChatEngine`` (the app's engine) and writes the
    answers and the cache figures it would show; the other ranks follow its jobs."""
    import threading

    from ckv_mlx.chat.engine import ChatEngine
    from ckv_mlx.chat.events import CacheView, ChatSettings, Failure, Reply
    from ckv_mlx.group.ranks import Ranks

    settings = ChatSettings(model=folder, precision="float32", budget="64", max_tokens=6, pipeline=pipeline)
    ranks = Ranks()
    if not ranks.leader:
        return ChatEngine(settings, lambda event: None, ranks=ranks).follow()
    events, replied = [], threading.Semaphore(0)

    def emit(event):
        events.append(event)
        if isinstance(event, (Reply, Failure)):
            replied.release()

    engine = ChatEngine(settings, emit, ranks=ranks)
    engine.open(document)
    for question in questions:
        engine.ask(question)
        assert replied.acquire(timeout=120), "no answer"
    engine.close(timeout=60)
    views = [e for e in events if isinstance(e, CacheView)]
    out.mkdir(parents=True, exist_ok=True)
    (out / "chat.json").write_text(json.dumps({
        "replies": [e.text for e in events if isinstance(e, Reply)],
        "failures": [e.text for e in events if isinstance(e, Failure)],
        "kept_bytes": views[-1].kept_bytes, "full_bytes": views[-1].full_bytes, "held_bytes": views[-1].held_bytes}))


if __name__ == "__main__":
    if sys.argv[1] == "chat":
        folder, document, questions, out, mode = sys.argv[2:]
        chat(folder, document, questions.split("|"), Path(out), mode == "pipeline")
    else:
        folder, methods, budgets, out, mode, precision, profile = sys.argv[1:]
        run(folder, methods.split(","), [int(b) for b in budgets.split(",")], Path(out), mode == "pipeline",
            precision, profile or None)
