"""Decoding from a session: greedy or sampled generation, pipelined as mlx-lm's
``generate_step``, and teacher forcing for the evaluation (a part of
:class:`~ckv_mlx.engine.session.Session`)."""

from __future__ import annotations

import time
from typing import Callable, Iterator

import mlx.core as mx
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from ..kv.layer_caches import all_trimmable
from ..policy.methods import Method
from .reading import PREFILL_STEP


class Decoding:
    """Generation and teacher forcing."""

    def answer(
        self, snapshot: tuple, method: Method, budget: int | None, question: list[int], max_tokens: int
    ) -> list[int]:
        """Prefill once, compress many: from a prefilled document ``snapshot``, feed the
        ``question`` tokens, compress with ``method`` and generate greedily."""
        self.restore(snapshot)
        self.method = method
        logits = self.feed(question)
        self.compress(budget)
        return list(self.generate(logits, max_tokens))

    def generate(
        self,
        logits: mx.array,
        max_tokens: int,
        temp: float = 0.0,
        should_stop: Callable[[], bool] = lambda: False,
        repetition_penalty: float | None = None,
    ) -> Iterator[int]:
        """Sample up to ``max_tokens`` tokens, starting from ``logits``; stops at EOS.

        Pipelined like mlx-lm's ``generate_step``: the step that feeds a token runs
        (``mx.async_eval``) while that token is handed out. Every yielded token is in
        the cache, so a follow-up continues after the whole answer; a token that ends
        the answer (EOS, a stop request) is taken back out. ``repetition_penalty``
        (mlx-lm's) looks at the last 20 tokens of the answer.
        """
        sampler = make_sampler(temp)
        processors = make_logits_processors(repetition_penalty=repetition_penalty)
        eos = set(self.tokenizer.eos_token_ids)
        last = time.perf_counter()

        def clock():  # decode time so far, excluding the caller's time between tokens
            nonlocal last
            now = time.perf_counter()
            self.stats.decode_s += now - last
            last = now

        def choose(logits: mx.array, answer: mx.array | None) -> mx.array:
            for processor in processors if answer is not None else ():
                logits = processor(answer, logits)
            return sampler(logits - mx.logsumexp(logits, keepdims=True))

        def feed(token: mx.array, answer: mx.array) -> mx.array:
            self.make_room(1)
            logits = self.model(token.reshape(1, 1), cache=self.model_caches())[:, -1, :]
            return choose(logits, answer)

        token = choose(logits, None)
        answer = token
        try:
            for _ in range(max_tokens):
                queries = [a.window_state() for a in self.attentions]
                ahead = feed(token, answer)
                mx.async_eval(ahead)
                value = token.item()
                if value in eos or should_stop():
                    self._unfeed_last(queries)
                    break
                self.stats.generated_tokens += 1
                self.note_read([value])
                clock()
                yield value
                last = time.perf_counter()
                token, answer = ahead, mx.concatenate([answer, ahead]) if processors else None
        finally:
            clock()
            self.stats.peak_memory_bytes = max(
                self.stats.peak_memory_bytes, mx.get_peak_memory()
            )

    def _unfeed_last(self, queries: list):
        """Take back the token fed ahead of its check: its row and its window query. Where
        mlx-lm cannot take it out of its own caches (a full sliding window, a recurrent
        state), it stays in every layer, as in mlx-lm's own chat."""
        if not all_trimmable(self.others.values()):
            return
        for cache in self.others.values():
            cache.trim(1)
        for cache in self.caches:
            cache.trim(1)
        for attention, saved in zip(self.attentions, queries):
            attention.restore_window_state(saved)

    def teacher_force(self, logits: mx.array, tokens: list[int]) -> mx.array:
        """Log-probabilities ``[len(tokens), vocab]`` of each of ``tokens`` being next,
        feeding them in turn after ``logits`` (the fidelity measurement)."""
        rows = [logits.reshape(1, -1)]
        step = self._step(PREFILL_STEP)
        body = tokens[:-1]
        for start in range(0, len(body), step):
            chunk = body[start : start + step]
            self.make_room(len(chunk))
            rows.append(self.model(mx.array([chunk]), cache=self.model_caches())[0])
            self.note_read(chunk)
        out = mx.concatenate(rows).astype(mx.float32)
        return out - mx.logsumexp(out, axis=-1, keepdims=True)
