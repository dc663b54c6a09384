"""The chat engine: answers against plain mlx-lm, stop, settings changes, save/resume,
and a one-line Failure (never an exception) for each bad request."""

from __future__ import annotations

import json
import threading
from dataclasses import replace
from functools import lru_cache

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import load_tokenizer

from ckv_mlx.chat import session_file
from ckv_mlx.chat.engine import ChatEngine, conversation_room, quiet_libraries
from ckv_mlx.chat.events import (
    CacheView, ChatSettings, Chunk, DocumentReady, Failure, Notice, Progress, Reply, Resumed, Saved,
)
from ckv_mlx.errors import CKVError
from ckv_mlx.model.gguf import builtin_model_folder
from ckv_mlx.policy.methods import make_method
from ckv_mlx.model.models import LoadedModel
from ckv_mlx.text.prompts import chat_messages, document_prefix, question_tokens, render
from ckv_mlx.engine.session import Session
from fakes import tiny_shape
from tiny import plain_greedy, tiny_model

DOC = ("Northwind Orchards grew apples and pears in the Yakima valley. " * 20).strip()


@lru_cache(maxsize=None)
def smollm_tokenizer():
    try:
        return load_tokenizer(builtin_model_folder())
    except CKVError as e:
        pytest.skip(f"built-in model unavailable: {e}")


def tiny_loader(context: int = 4096, arch: str = "llama", head_dim: int = 16):
    """A random model with the built-in model's tokenizer: fast, exact. A llama has 2
    layers, a family mixing kinds of layers 4 (2 of them compressing)."""
    def load(name):
        if name not in (None, "tiny"):
            raise CKVError(f"no model {name}")
        model = tiny_model(arch, layers=2 if arch == "llama" else 4, vocab=49152, head_dim=head_dim)
        return LoadedModel(model, smollm_tokenizer(), "tiny", tiny_shape(model), context)
    return load


class Recorder:
    """Collects the engine's events; ``wait`` blocks until enough of one kind came."""

    def __init__(self):
        self.events: list = []
        self.changed = threading.Condition()
        self.on_event = None

    def __call__(self, event):
        with self.changed:
            self.events.append(event)
            self.changed.notify_all()
        if self.on_event:
            self.on_event(event)

    def of(self, kind) -> list:
        return [e for e in self.events if isinstance(e, kind)]

    def wait(self, kind, count: int = 1, timeout: float = 120):
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.of(kind)) >= count, timeout), self.of(Failure)
        return self.of(kind)


@pytest.fixture
def doc(tmp_path):
    path = tmp_path / "doc.txt"
    path.write_text(DOC)
    return path


def start(settings: ChatSettings | None = None, context: int = 4096, arch: str = "llama", head_dim: int = 16):
    recorder = Recorder()
    settings = settings or ChatSettings(method="full", max_tokens=6)
    engine = ChatEngine(settings, recorder, loader=tiny_loader(context, arch, head_dim))
    return engine, recorder


def saved(engine, recorder, path) -> tuple[list, dict]:
    """Save the session; its caches and metadata as written."""
    engine.save(path)
    recorder.wait(Saved, len(recorder.of(Saved)) + 1)
    saved = session_file.read(path)
    return saved.caches, saved.metadata


def test_answers_match_plain_mlx_lm_over_the_fed_tokens(doc, tmp_path):
    engine, recorder = start(ChatSettings(method="full", max_tokens=6))
    try:
        engine.open(doc)
        engine.ask("Where are the orchards?")
        engine.ask("What fruit grows there?")
        recorder.wait(Reply, 2)
        _, meta = saved(engine, recorder, tmp_path / "s.ckv")
    finally:
        engine.close()
    model = tiny_model("llama", layers=2, vocab=49152)
    tokenizer = smollm_tokenizer()
    first = render(tokenizer, DOC, "Where are the orchards?", raw=False)
    t1, t2 = meta["turns"]
    assert t1["question_tokens"] == first[len(first) - len(t1["question_tokens"]):]
    fed = first + t1["answer_tokens"] + t2["question_tokens"]
    eos = set(tokenizer.eos_token_ids)
    for turn, prompt in ((t1, first), (t2, fed)):
        reference = plain_greedy(model, prompt, 6)
        reference = reference[: next((i for i, t in enumerate(reference) if t in eos), 6)]
        assert turn["answer_tokens"] == reference
    assert [e.done for e in recorder.of(Progress)][-1] == recorder.of(DocumentReady)[0].tokens
    streamed = "".join(c.text for c in recorder.of(Chunk))
    assert streamed == "".join(r.text for r in recorder.of(Reply)) and streamed


def test_stop_keeps_the_partial_answer_and_a_consistent_cache(doc, tmp_path):
    engine, recorder = start(ChatSettings(method="snapkv", budget="64", policy="first-question", max_tokens=200))
    recorder.on_event = lambda e: isinstance(e, Chunk) and engine.stop()
    try:
        engine.open(doc)
        engine.ask("Where are the orchards?")
        reply = recorder.wait(Reply)[0]
        recorder.on_event = None
        caches, meta = saved(engine, recorder, tmp_path / "s.ckv")
        engine.ask("And the pears?")
        recorder.wait(Reply, 2)
    finally:
        engine.close()
    assert reply.interrupted
    turn = meta["turns"][0]
    assert 1 <= len(turn["answer_tokens"]) <= 2
    fed = meta["prompt_tokens"] + len(turn["question_tokens"]) + len(turn["answer_tokens"])
    assert {c.offset for c in caches} == {fed}
    assert all(c.length <= 64 + 64 for c in caches)
    assert not recorder.of(Failure)


def test_bad_requests_fail_with_one_line_and_leave_the_session_usable(doc, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    engine, recorder = start(ChatSettings(method="full", max_tokens=4), context=400)
    long_doc = tmp_path / "long.txt"
    long_doc.write_text(DOC * 3)
    try:
        engine.ask("Anything?")  # no document yet
        engine.open(tmp_path / "missing.pdf")
        engine.open(empty)
        engine.open(long_doc)
        recorder.wait(Failure, 4)
        engine.open(doc)
        recorder.wait(DocumentReady)
        engine.ask("Tell me more " * 40)  # over the context once the document is in
        engine.save(tmp_path / "no-such-folder" / "s.ckv")
        engine.set_method("no-such-method")
        recorder.wait(Failure, 7)
        engine.ask("Where?")
        recorder.wait(Reply)
    finally:
        engine.close()
    messages = [f.text for f in recorder.of(Failure)]
    for message, words in zip(messages, [
        ("no document", "/doc"), ("not found",), ("no text",), ("long.txt", "context of 400"),
        ("context of 400", "with the document alone", "shorten the question"), ("cannot write",), ("unknown method",),
    ]):
        assert "\n" not in message
        assert all(w in message for w in words), (message, words)
    assert len(recorder.of(DocumentReady)) == 1
    assert all(p.total == recorder.of(DocumentReady)[0].tokens for p in recorder.of(Progress))


@pytest.mark.parametrize("head_dim, packed", [(16, None), (32, 8)])
def test_the_kept_rows_are_8_bit_by_default_or_as_computed_with_a_note(doc, head_dim, packed):
    engine, recorder = start(ChatSettings(method="snapkv", budget="48", max_tokens=2), head_dim=head_dim)
    try:
        engine.open(doc)
        engine.ask("Where?")
        recorder.wait(Reply)
    finally:
        engine.close()
    assert recorder.of(CacheView)[-1].kv_bits == packed
    noted = [n.text for n in recorder.of(Notice) if "the kept rows stay as computed" in n.text]
    assert len(noted) == (packed is None)


def test_budget_too_small_is_refused_before_prefill(doc):
    engine, recorder = start(ChatSettings(method="snapkv", budget="4"))
    try:
        engine.open(doc)
        failure = recorder.wait(Failure)[0]
    finally:
        engine.close()
    assert "too small" in failure.text and not recorder.of(Progress)


def test_budget_change_applies_now_when_the_full_cache_is_kept(doc):
    engine, recorder = start(ChatSettings(method="snapkv", budget="64", policy="per-question", max_tokens=3))
    try:
        engine.open(doc)
        engine.set_budget("32")
        engine.ask("Where?")
        recorder.wait(Reply)
    finally:
        engine.close()
    assert "from the next question" in recorder.of(Notice)[-1].text
    answering = [v for v in recorder.of(CacheView) if v.phase == "answering"]
    assert answering and all(v.budget == 32 for v in answering)
    assert max(answering[0].layer_tokens) <= 32 + 64  # budget + one region


def test_budget_change_after_the_cache_was_dropped_needs_a_reread(doc):
    settings = ChatSettings(method="snapkv", budget="64", policy="first-question", max_tokens=3, kv_bits=16)
    engine, recorder = start(settings)  # as computed: no note that head size 16 cannot pack
    try:
        engine.open(doc)
        engine.ask("Where?")
        engine.set_budget("32")
        recorder.wait(Notice)
        assert "/reread" in recorder.of(Notice)[-1].text
        engine.reread()
        recorder.wait(DocumentReady)
        recorder.wait(Notice, 2)
    finally:
        engine.close()
    assert "again" in recorder.of(Notice)[-1].text
    view = recorder.of(CacheView)[-1]
    assert view.budget == 32 and view.compressed and max(view.layer_tokens) <= 32 + 64
    before = next(v for v in reversed(recorder.of(CacheView)) if v.budget == 64)
    assert view.position == before.position  # the same document and turn, read again


def saved_before_the_default(path):
    """Rewrite a session saved as computed as the sessions saved before 8 bits became
    the default recorded it: ``kv_bits`` null."""
    arrays, meta = mx.load(str(path), format="safetensors", return_metadata=True)
    info = json.loads(meta["ckv"])
    info["settings"]["kv_bits"] = None
    mx.save_safetensors(str(path), arrays, metadata={**meta, "ckv": json.dumps(info)})


@pytest.mark.parametrize("arch, kv_bits", [("llama", 16), ("gemma3_text", 16), ("qwen3_next", None), ("llama", 4),
                                           ("gemma3_text", 8)])
def test_saved_session_resumes_and_continues_identically(doc, tmp_path, arch, kv_bits):
    """Sliding-window and recurrent layers (mlx-lm's own caches) are saved beside ours,
    and kept rows quantized stay packed as they were (None: the default, 8 bits; 16: as
    computed, also when saved before the default, which recorded null)."""
    settings = ChatSettings(method="snapkv", budget="48", policy="first-question", max_tokens=5, kv_bits=kv_bits,
                            kv_group_size=32 if kv_bits in (4, 8) else None)
    packed = None if kv_bits == 16 else kv_bits or 8
    engine, recorder = start(settings, arch=arch, head_dim=32)
    try:
        engine.open(doc)
        engine.ask("Where are the orchards?")
        recorder.wait(Reply)
        caches, _ = saved(engine, recorder, tmp_path / "s.ckv")
        assert all((c.kv_bits and c.kv_bits.bits) == packed and (c.packed is not None) == bool(packed) for c in caches)
        assert (recorder.of(CacheView)[-1].kv_bits) == packed
        engine.ask("What fruit?")
        original = recorder.wait(Reply, 2)[1]
    finally:
        engine.close()
    if not packed:
        saved_before_the_default(tmp_path / "s.ckv")
    engine, recorder = start(ChatSettings(), arch=arch, head_dim=32)
    try:
        engine.resume(tmp_path / "s.ckv")
        resumed = recorder.wait(Resumed)[0]
        engine.ask("What fruit?")
        again = recorder.wait(Reply)[0]
    finally:
        engine.close()
    assert resumed.settings == replace(settings, kv_bits=packed or 16)
    assert resumed.turns[0][0] == "Where are the orchards?"
    assert again == original
    assert not recorder.of(Progress)  # no prefill


@pytest.mark.parametrize("case, words", [
    ("other model", ("saved with model tiny", "--model")),
    ("changed document", ("has changed", "--doc")),
    ("not a session", ("not a ckv-chat session",)),
    ("missing", ("no such session file",)),
])
def test_resume_refusals(doc, tmp_path, case, words):
    engine, recorder = start()
    try:
        engine.open(doc)
        recorder.wait(DocumentReady)
        saved(engine, recorder, tmp_path / "s.ckv")
    finally:
        engine.close()
    target = tmp_path / "s.ckv"
    settings = ChatSettings(model="other") if case == "other model" else ChatSettings()
    if case == "changed document":
        doc.write_text(DOC + " One more sentence.")
    elif case == "not a session":
        target.write_bytes(b"\x00" * 64)
    elif case == "missing":
        target = tmp_path / "nowhere.ckv"
    engine, recorder = start(settings)
    try:
        engine.resume(target)
        failure = recorder.wait(Failure)[0]
    finally:
        engine.close()
    assert all(w in failure.text for w in words), failure.text
    assert not recorder.of(Resumed)


@pytest.mark.slow
def test_real_model_sees_exactly_the_chat_template(default_model, tmp_path):
    """Two turns on the built-in model: the fed tokens decode to the chat template's text
    of the whole conversation, and the answers are plain mlx-lm's over those tokens."""
    doc = tmp_path / "doc.txt"
    doc.write_text("The orchard manager is Helena Marsh. The harvest began on 3 September.")
    recorder = Recorder()
    engine = ChatEngine(ChatSettings(method="full", max_tokens=12), recorder, loader=lambda name: default_model)
    questions = ["Who is the orchard manager?", "When did the harvest begin?"]
    try:
        engine.open(doc)
        for q in questions:
            engine.ask(q)
        replies = recorder.wait(Reply, 2)
        _, meta = saved(engine, recorder, tmp_path / "s.ckv")
    finally:
        engine.close()
    tokenizer = default_model.tokenizer
    t1, t2 = meta["turns"]
    first = render(tokenizer, doc.read_text(), questions[0], raw=False)
    fed = first + t1["answer_tokens"] + t2["question_tokens"]
    text = tokenizer.apply_chat_template(
        chat_messages(doc.read_text(), [(questions[0], replies[0].text)], questions[1]),
        add_generation_prompt=True, tokenize=False)
    assert tokenizer.decode(fed) == text
    eos = set(tokenizer.eos_token_ids)
    for turn, prompt in ((t1, first), (t2, fed)):
        reference = plain_greedy(default_model.model, prompt, 12)
        assert turn["answer_tokens"] == reference[: next((i for i, t in enumerate(reference) if t in eos), 12)]
    assert "Helena Marsh" in replies[0].text
    assert "".join(c.text for c in recorder.of(Chunk)) == replies[0].text + replies[1].text


def test_a_document_over_the_memory_limit_is_read_in_chunks_with_the_first_question(tmp_path, monkeypatch):
    path = tmp_path / "long.txt"
    path.write_text(" ".join([DOC] * 8))
    limit = 400 * 1024  # the 2-layer model's full cache of this document is about 1 MiB
    reads = []
    prefill = Session.prefill
    monkeypatch.setattr(Session, "prefill", lambda self, tokens, *a, **kw: reads.append(kw) or prefill(self, tokens, *a, **kw))
    settings = ChatSettings(method="snapkv", budget="64", max_tokens=3, kv_limit="400KiB", full_cache="memory",
                            kv_bits=16)  # as computed: no note that head size 16 cannot pack
    engine, recorder = start(settings)
    try:
        engine.open(path)
        ready = recorder.wait(DocumentReady)[0]
        assert ready.seconds is None and not reads  # nothing read before a question is known
        engine.save(tmp_path / "early.ckv")
        assert "nothing to save yet: long.txt is read with the first question" in recorder.wait(Failure)[0].text
        engine.ask("Where are the orchards?")
        recorder.wait(Reply)
        stats = engine._session.stats
        question = engine._document.turns[0].question_tokens
        engine.reread()  # the conversation so far: chunks scored by its first question again
        recorder.wait(Notice, 3)
    finally:
        engine.close()
    first, reread, _ = (n.text for n in recorder.of(Notice))
    assert "would not fit the KV memory limit" in first and "read with your first question" in first
    assert reread.endswith("scored by the first question")
    assert [kw["question"] for kw in reads] == [question, question] and reads[0]["working_budget"] > 0
    assert stats.kv_bytes_full > 2.5 * limit
    assert 0 < stats.peak_kv_bytes <= limit

def test_per_question_panel_keeps_showing_what_the_last_answer_used(doc, tmp_path):
    """After the answer the full cache is back, but the panel shows the compressed copy
    the answer used (bytes, tokens per layer, decode speed) beside what is held."""
    engine, recorder = start(ChatSettings(method="snapkv", budget="64", policy="per-question", max_tokens=5,
                                          full_cache="memory"))
    try:
        engine.open(doc)
        engine.ask("Where are the orchards?")
        recorder.wait(Reply)
        view = recorder.of(CacheView)[-1]
        _, meta = saved(engine, recorder, tmp_path / "s.ckv")
    finally:
        engine.close()
    tokenizer, (turn,) = smollm_tokenizer(), meta["turns"]
    fed = render(tokenizer, DOC, "Where are the orchards?", raw=False)
    used = Session(tiny_model("llama", layers=2, vocab=49152), tokenizer, make_method("snapkv")[0])
    used.feed(fed)
    used.compress(64)
    used.feed(turn["answer_tokens"])  # the compressed copy at the answer's end
    held = Session(tiny_model("llama", layers=2, vocab=49152), tokenizer, make_method("full")[0])
    held.feed(fed)
    held.feed(turn["answer_tokens"])  # the full cache the next question builds on
    assert view.phase == "idle" and view.compressed
    assert view.layer_tokens == [c.length for c in used.caches] == [64 + len(turn["answer_tokens"])] * 2
    assert view.kept_bytes == used.kv_bytes < view.full_bytes
    assert view.held_bytes == held.kv_bytes == view.full_bytes  # what is held is the full cache
    assert 0 < view.ratio < 1 and view.decode_tps > 0


def test_an_internal_error_is_a_failure_and_its_traceback_goes_to_the_log(doc, tmp_path, capfd):
    def broken(name):
        raise RuntimeError("boom")

    log = tmp_path / "ckv-chat.log"
    recorder = Recorder()
    with quiet_libraries(log):  # what ckv-chat runs the app under
        engine = ChatEngine(ChatSettings(), recorder, loader=broken)
        try:
            engine.open(doc)
            failure = recorder.wait(Failure)[0]
        finally:
            engine.close()
    assert failure.text.startswith("internal error (RuntimeError: boom); please report it")
    assert capfd.readouterr().err == ""  # nothing onto Textual's screen
    assert "Traceback" in log.read_text() and "boom" in log.read_text()


def penalised_greedy(model, tokens: list[int], n: int, penalty: float, context: int = 20) -> list[int]:
    """Greedy tokens of plain mlx-lm with the CTRL repetition penalty written out: each of
    the answer's last ``context`` tokens has its logit divided (if positive) or multiplied
    (if negative) by ``penalty``."""
    cache = make_prompt_cache(model)
    logits = model(mx.array([tokens]), cache=cache)[0, -1]
    out: list[int] = []
    for _ in range(n):
        row = np.array(logits.astype(mx.float32))
        seen = list(set(out[-context:]))
        row[seen] = np.where(row[seen] > 0, row[seen] / penalty, row[seen] * penalty)
        out.append(int(row.argmax()))
        logits = model(mx.array([[out[-1]]]), cache=cache)[0, -1]
    return out


def test_repetition_penalty_reaches_the_answer(doc, tmp_path):
    answers = {}
    for penalty in (None, 1.5):
        engine, recorder = start(ChatSettings(method="full", max_tokens=12, repetition_penalty=penalty))
        try:
            engine.open(doc)
            engine.ask("Where are the orchards?")
            recorder.wait(Reply)
            _, meta = saved(engine, recorder, tmp_path / "s.ckv")
        finally:
            engine.close()
        answers[penalty] = meta["turns"][0]["answer_tokens"]
    model = tiny_model("llama", layers=2, vocab=49152)
    prompt = render(smollm_tokenizer(), DOC, "Where are the orchards?", raw=False)
    eos = set(smollm_tokenizer().eos_token_ids)
    reference = penalised_greedy(model, prompt, 12, 1.5)
    assert answers[1.5] == reference[: next((i for i, t in enumerate(reference) if t in eos), 12)]
    assert answers[1.5] != answers[None]  # the penalty changed this answer


THINK_TEMPLATE = (  # ChatML that, like Qwen3's, drops <think> blocks from assistant turns before the last question
    "{%- set ns = namespace(last=-1) -%}"
    "{%- for m in messages -%}{%- if m.role == 'user' -%}{%- set ns.last = loop.index0 -%}{%- endif -%}{%- endfor -%}"
    "{%- for m in messages -%}"
    "{%- set content = m.content -%}"
    "{%- if m.role == 'assistant' and loop.index0 < ns.last -%}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') -%}{%- endif -%}"
    "{{- '<|im_start|>' + m.role + '\\n' + content + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
THOUGHT = "<think>\nThe text says Yakima.\n</think>\n\nIn the Yakima valley."


def think_tokenizer():
    """The built-in model's tokenizer with :data:`THINK_TEMPLATE` as its chat template."""
    smollm_tokenizer()  # skips if the built-in model is unavailable
    tokenizer = load_tokenizer(builtin_model_folder())
    tokenizer._tokenizer.chat_template = THINK_TEMPLATE
    return tokenizer


def chatml(*turns: tuple[str, str]) -> str:
    """ChatML text of user/assistant ``turns`` as they were fed, then the generation prompt."""
    return "".join(f"<|im_start|>{role}\n{text}<|im_end|>\n" for role, text in turns)


def test_a_follow_up_feeds_only_what_follows_the_answer_when_the_template_rewrites_it():
    tokenizer = think_tokenizer()
    prefix = document_prefix(tokenizer, DOC)
    tokens = question_tokens(tokenizer, DOC, prefix, [("Where?", THOUGHT)], "What fruit?")
    after_answer = "<|im_end|>\n" + chatml(("user", "What fruit?")) + "<|im_start|>assistant\n"
    assert tokenizer.decode(tokens) == after_answer


def test_a_template_that_hides_earlier_answers_refuses_follow_ups_in_one_line():
    tokenizer = think_tokenizer()
    tokenizer._tokenizer.chat_template = THINK_TEMPLATE.replace("content.split('</think>')[-1].lstrip('\\n')", "'(earlier answer)'")
    with pytest.raises(CKVError, match="does not show the last answer as written.*/doc"):
        question_tokens(tokenizer, DOC, document_prefix(tokenizer, DOC), [("Where?", THOUGHT)], "What fruit?")


def test_follow_ups_under_a_template_that_strips_thinking_feed_each_answer_once(doc, tmp_path, monkeypatch):
    tokenizer = think_tokenizer()
    thought = tokenizer.encode(THOUGHT, add_special_tokens=False)
    monkeypatch.setattr(Session, "generate", lambda self, logits, max_tokens, **kw: iter(thought))

    def loader(name):
        model = tiny_model("llama", layers=2, vocab=49152)
        return LoadedModel(model, tokenizer, "tiny", tiny_shape(model), 4096)

    recorder = Recorder()
    engine = ChatEngine(ChatSettings(method="full", max_tokens=50), recorder, loader=loader)
    try:
        engine.open(doc)
        for question in ("Where?", "What fruit?", "When?"):
            engine.ask(question)
        recorder.wait(Reply, 3)
        caches, meta = saved(engine, recorder, tmp_path / "s.ckv")
    finally:
        engine.close()
    fed = meta["prompt_tokens"] + sum(len(t["question_tokens"]) + len(t["answer_tokens"]) for t in meta["turns"])
    expected = chatml(("user", f"{DOC}\n\nWhere?"), ("assistant", THOUGHT), ("user", "What fruit?"),
                      ("assistant", THOUGHT), ("user", "When?")) + "<|im_start|>assistant\n" + THOUGHT
    text = tokenizer.decode(document_prefix(tokenizer, DOC) + [
        t for turn in meta["turns"] for t in turn["question_tokens"] + turn["answer_tokens"]])
    assert text == expected
    assert {c.offset for c in caches} == {fed}


LONG = " ".join(f"Row {i} of the orchard ledger lists pears." for i in range(60))  # ~600 tokens


def kept_tokens(tokens: list[int], n: int, where: str) -> list[int]:
    """``tokens`` without ``n`` of them at ``where``: the cut, written out."""
    if where == "start":
        return tokens[n:]
    if where == "end":
        return tokens[: len(tokens) - n]
    head = (len(tokens) - n) // 2
    return tokens[:head] + tokens[head + n :]


def opened_long(tmp_path, settings: ChatSettings):
    """An engine with a 400-token context, opening LONG (about 600 tokens) from a file."""
    path = tmp_path / "long.txt"
    path.write_text(LONG)
    engine, recorder = start(settings, context=400)
    engine.open(path)
    return engine, recorder


def test_a_document_over_the_context_is_refused_with_the_choices(tmp_path):
    engine, recorder = opened_long(tmp_path, ChatSettings(method="full", max_tokens=8))
    try:
        failure = recorder.wait(Failure)[0]
    finally:
        engine.close()
    assert "\n" not in failure.text and not recorder.of(Progress)
    assert all(w in failure.text for w in ("long.txt", "context of 400", "/truncate middle", "start, end"))


@pytest.mark.parametrize("where", ["start", "middle", "end"])
@pytest.mark.parametrize("how", ["flag", "command"])
def test_a_document_over_the_context_is_cut_where_asked_and_says_how_much(tmp_path, where, how):
    """--truncate WHERE, or /truncate WHERE after the refusal: the notice says how many
    tokens were dropped, and the answer is plain mlx-lm's over the document cut there."""
    path = tmp_path / "long.txt"
    path.write_text(LONG)
    settings = ChatSettings(method="full", max_tokens=8, truncate=where if how == "flag" else "none")
    engine, recorder = start(settings, context=400)
    try:
        engine.open(path)
        if how == "command":
            recorder.wait(Failure)
            engine.truncate(where)
        ready = recorder.wait(DocumentReady)[0]
        engine.ask("Which fruit?")
        recorder.wait(Reply)
        _, meta = saved(engine, recorder, tmp_path / "s.ckv")
    finally:
        engine.close()
    tokenizer, (turn,) = smollm_tokenizer(), meta["turns"]
    notice = next(n.text for n in recorder.of(Notice) if "dropped" in n.text)
    dropped = int(notice.split("dropped ")[1].split(" ")[0].replace(",", ""))
    assert f"at the {where}" in notice and "long.txt" in notice
    kept = tokenizer.decode(kept_tokens(tokenizer.encode(LONG, add_special_tokens=False), dropped, where))
    prompt = render(tokenizer, kept, "Which fruit?", raw=False)
    assert meta["prompt_tokens"] + len(turn["question_tokens"]) == len(prompt) and ready.tokens == meta["prompt_tokens"]
    reference = plain_greedy(tiny_model("llama", layers=2, vocab=49152), prompt, 8)
    eos = set(tokenizer.eos_token_ids)
    assert turn["answer_tokens"] == reference[: next((i for i, t in enumerate(reference) if t in eos), 8)]
    room = conversation_room(settings, 400)
    assert room == 100 and "leaving 100 for the conversation" in notice  # a quarter of the context by default
    needed = len(document_prefix(tokenizer, LONG)) + 8 + room - 400  # tokens over, with room to talk
    assert ready.tokens + 8 + room <= 400 and needed <= dropped <= needed + 16
    assert len(recorder.of(Failure)) == (how == "command")


def test_a_cut_document_resumes(tmp_path):
    path = tmp_path / "long.txt"
    path.write_text(LONG)
    engine, recorder = start(ChatSettings(method="full", max_tokens=8, truncate="middle"), context=400)
    try:
        engine.open(path)
        recorder.wait(DocumentReady)
        saved(engine, recorder, tmp_path / "s.ckv")
    finally:
        engine.close()
    engine, recorder = start(ChatSettings(), context=400)
    try:
        engine.resume(tmp_path / "s.ckv")
        resumed = recorder.wait(Resumed)[0]
        engine.ask("Which fruit?")
        recorder.wait(Reply)
    finally:
        engine.close()
    assert resumed.settings.truncate == "middle" and not recorder.of(Failure)


@pytest.mark.parametrize("precision", [None, "native", "float32"])
def test_the_precision_reaches_the_loader(doc, precision):
    calls = []
    tiny = tiny_loader()

    def loader(name, **kwargs):
        calls.append((name, kwargs))
        return tiny(name)

    recorder = Recorder()
    engine = ChatEngine(ChatSettings(method="full", max_tokens=6, precision=precision), recorder, loader=loader)
    try:
        engine.open(doc)
        recorder.wait(DocumentReady)
    finally:
        engine.close()
    assert calls == [(None, {} if precision is None else {"precision": precision})]  # None: load_model's default


QUESTIONS = [f"What does row {i} list?" for i in range(10)]
FILLING = " ".join(f"Row {i} of the orchard ledger lists pears." for i in range(26))  # ~270 of a 400-token context


@pytest.mark.parametrize("full_cache", ["disk", "memory"])
def test_ten_turns_over_a_document_that_fills_the_context_drop_the_oldest_turns(tmp_path, full_cache):
    """Never refused for length: the oldest turns go (said in a note), never the document
    or the question; each answer is plain mlx-lm's over exactly what the model was fed
    (the document, the turns kept, the question), and every prompt fits with its answer."""
    path = tmp_path / "filling.txt"
    path.write_text(FILLING)
    settings = ChatSettings(method="full", max_tokens=8, full_cache=full_cache, store_dir=str(tmp_path / "stores"))
    engine, recorder = start(settings, context=400)
    fed = []
    try:
        engine.open(path)
        recorder.wait(DocumentReady)
        for n, question in enumerate(QUESTIONS, 1):
            engine.ask(question)
            recorder.wait(Reply, n)
            fed.append(saved(engine, recorder, tmp_path / f"s{n}.ckv")[1]["turns"])
    finally:
        engine.close()
    assert not recorder.of(Failure)
    notes = [n.text for n in recorder.of(Notice) if "oldest" in n.text]
    assert notes and all("dropped the oldest" in n and "the document and the last" in n for n in notes)
    tokenizer, model = smollm_tokenizer(), tiny_model("llama", layers=2, vocab=49152)
    eos, prefix = set(tokenizer.eos_token_ids), document_prefix(tokenizer, FILLING)
    assert 250 < len(prefix) < 400 - 8
    for n, turns in enumerate(fed, 1):
        assert turns[-1]["question"] == QUESTIONS[n - 1] and len(turns) <= n
        assert turns[0]["question_tokens"] == question_tokens(tokenizer, FILLING, prefix, [], turns[0]["question"])
        prompt = prefix + [t for turn in turns[:-1] for t in turn["question_tokens"] + turn["answer_tokens"]]
        prompt += turns[-1]["question_tokens"]
        assert len(prompt) + 8 <= 400, n
        reference = plain_greedy(model, prompt, 8)
        assert turns[-1]["answer_tokens"] == reference[: next((i for i, t in enumerate(reference) if t in eos), 8)], n
    assert len(fed[-1]) < 10


def test_context_says_where_the_tokens_go_and_truncate_takes_the_conversations_room(tmp_path):
    engine, recorder = opened_long(tmp_path, ChatSettings(method="full", max_tokens=8))
    try:
        recorder.wait(Failure)
        engine.truncate("middle", 150)
        ready = recorder.wait(DocumentReady)[0]
        engine.ask("Which fruit?")
        recorder.wait(Reply)
        engine.context()
        engine.truncate("middle", 400)
        engine.truncate("middle", -5)
        recorder.wait(Failure, 3)
    finally:
        engine.close()
    assert ready.tokens + 8 + 150 <= 400
    cut = next(n.text for n in recorder.of(Notice) if "dropped" in n.text)
    assert "leaving 150 for the conversation" in cut
    line = next(n.text for n in recorder.of(Notice) if n.text.startswith("context of 400"))
    assert f"the document {ready.tokens:,}" in line and "(1 turn)" in line and "room for an answer 8" in line
    assert "leaves nothing" in recorder.of(Failure)[-2].text
    assert recorder.of(Failure)[-1].text == "a conversation room must be 0 or more tokens, not -5"
