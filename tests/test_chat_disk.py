"""ckv-chat with the full cache on disk (the default): the same answers as with it in
memory, reopening without reading, and every disk failure one line with the chat going on."""

from __future__ import annotations

import bisect
import errno
import json
import shutil

import pytest

from ckv_mlx.chat import session_file
from ckv_mlx.disk import disk_cache
from ckv_mlx.chat.events import (
    CacheView, ChatSettings, DocumentReady, Failure, Notice, Progress, Reply, Resumed, Saved,
)
from ckv_mlx.engine.session import Session
from ckv_mlx.disk.store import list_stores
from test_chat_engine import DOC, doc, start  # noqa: F401 (doc: a fixture)

QUESTIONS = ("Where are the orchards?", "What fruit grows there?", "Which valley?")


MIXED = ["gemma3_text", "qwen3_next"]  # a sliding window, a recurrent state beside the compressing layers


def chat(path, arch="llama", **settings) -> tuple[list[list[int]], object]:
    """Ask the questions about ``path``; the answers' tokens and the recorder."""
    engine, recorder = start(ChatSettings(method="snapkv", budget="48", max_tokens=6, **settings), arch=arch)
    try:
        engine.open(path)
        for question in QUESTIONS:
            engine.ask(question)
        recorder.wait(Reply, len(QUESTIONS))
        answers = [t.answer_tokens for t in engine._document.turns]
    finally:
        engine.close()
    return answers, recorder


def notices(recorder) -> str:
    return "\n".join(n.text for n in recorder.of(Notice))


def test_on_disk_the_chat_answers_as_with_the_full_cache_in_memory(doc, tmp_path):
    in_memory, _ = chat(doc, full_cache="memory")
    on_disk, recorder = chat(doc, store_dir=str(tmp_path / "stores"))
    assert on_disk == in_memory and any(on_disk)
    view = recorder.of(CacheView)[-1]
    assert view.held_bytes == view.kept_bytes < view.full_bytes  # memory holds the selection only
    row = 2 * 2 * 16 * 2 * 4  # one token: 2 layers x 2 KV heads x 16, keys and values, float32
    assert view.disk_bytes == (view.position - len(on_disk[-1])) * row  # all but the last answer, read with the next question
    assert view.reselect_s > 0
    assert [s["tokens"] for s in list_stores(tmp_path / "stores")] == [recorder.of(DocumentReady)[0].tokens]


@pytest.mark.parametrize("arch", MIXED)
def test_a_mixed_model_answers_on_disk_as_with_the_full_cache_in_memory(doc, tmp_path, arch):
    """Each question restores the other layers' caches to where the disk's rows end,
    then reads the last answer and the question against every row."""
    in_memory, _ = chat(doc, arch, full_cache="memory")
    on_disk, recorder = chat(doc, arch, store_dir=str(tmp_path / "stores"))
    assert on_disk == in_memory and any(on_disk)
    view = recorder.of(CacheView)[-1]
    assert view.disk_bytes > 0 and view.kept_bytes < view.full_bytes
    assert view.held_bytes == view.kept_bytes  # the other layers' caches at the disk's end are on disk, not here
    assert "stays in memory" not in notices(recorder)


@pytest.mark.parametrize("arch", ["llama", *MIXED])
def test_a_document_read_before_is_not_read_again(doc, tmp_path, arch):
    first, recorder = chat(doc, arch, store_dir=str(tmp_path))
    assert recorder.of(Progress)
    again, recorder = chat(doc, arch, store_dir=str(tmp_path))
    assert again == first
    assert not recorder.of(Progress) and "was read before: its stored cache" in notices(recorder)


def test_a_damaged_store_is_removed_and_the_document_read_again(doc, tmp_path):
    first, _ = chat(doc, store_dir=str(tmp_path))
    (store,) = list_stores(tmp_path)
    keys = store["path"] / "001.keys"
    data = bytearray(keys.read_bytes())
    data[100] ^= 0xFF
    keys.write_bytes(bytes(data))
    again, recorder = chat(doc, store_dir=str(tmp_path))
    assert again == first and recorder.of(Progress)
    assert "was damaged (001.keys fails its checksum) and has been removed; reading the document again" in notices(recorder)
    assert len(list_stores(tmp_path)) == 1  # written anew


def test_an_unwritable_store_folder_keeps_the_full_cache_in_memory(doc, tmp_path):
    (tmp_path / "file").write_text("")
    in_memory, _ = chat(doc, full_cache="memory")
    answers, recorder = chat(doc, store_dir=str(tmp_path / "file" / "stores"))
    assert answers == in_memory
    assert "cannot write the full cache to" in notices(recorder) and "stays in memory meanwhile" in notices(recorder)
    assert recorder.of(CacheView)[-1].disk_bytes == 0


def test_on_disk_a_long_document_is_read_at_once_and_each_question_selects_from_all_of_it(tmp_path, monkeypatch):
    path = tmp_path / "long.txt"
    path.write_text(" ".join([DOC] * 8))
    reads = []
    prefill = Session.prefill
    monkeypatch.setattr(Session, "prefill", lambda self, tokens, *a, **kw: reads.append(kw) or prefill(self, tokens, *a, **kw))
    answers, recorder = chat(path, kv_limit="400KiB", store_dir=str(tmp_path / "stores"))
    assert recorder.of(DocumentReady)[0].seconds is not None  # read on opening, with no question
    assert len(reads) == 1 and reads[0]["question"] is None and reads[0]["working_budget"] > 0
    assert "every row goes to disk, so each question selects from the whole document" in notices(recorder)
    (store,) = list_stores(tmp_path / "stores")
    assert store["tokens"] == recorder.of(DocumentReady)[0].tokens  # every row, not the working budget
    assert all(view.held_bytes <= 400 * 1024 for view in recorder.of(CacheView))


def saved_then_asked(doc, tmp_path, before: int, arch: str = "llama") -> Reply:
    """Ask ``before`` questions with the full cache on disk, save to s.ckv, ask the next:
    its reply."""
    settings = ChatSettings(method="snapkv", budget="48", max_tokens=6, store_dir=str(tmp_path / "stores"))
    engine, recorder = start(settings, arch=arch)
    try:
        engine.open(doc)
        for question in QUESTIONS[:before]:
            engine.ask(question)
        recorder.wait(Reply, before)
        engine.save(tmp_path / "s.ckv")
        recorder.wait(Saved)
        engine.ask(QUESTIONS[before])
        return recorder.wait(Reply, before + 1)[before]
    finally:
        engine.close()


def resumed_then_asked(path, question: str, arch: str = "llama", head_dim: int = 16) -> tuple[Reply, object]:
    engine, recorder = start(ChatSettings(), arch=arch, head_dim=head_dim)
    try:
        engine.resume(path)
        recorder.wait(Resumed)
        engine.ask(question)
        return recorder.wait(Reply)[0], recorder
    finally:
        engine.close()


@pytest.mark.parametrize("arch", ["llama", *MIXED])
def test_a_saved_session_refers_to_the_store_carries_the_conversation_and_resumes_at_once(doc, tmp_path, arch):
    original = saved_then_asked(doc, tmp_path, 2, arch)
    saved = session_file.read(tmp_path / "s.ckv")
    disk = saved.on_disk
    assert disk.store == list_stores(tmp_path / "stores")[0]["key"]
    assert disk.tail_tokens and len(disk.tail) == len(saved.caches) and disk.selection_queries[0] is not None
    assert bool(saved.others) == bool(disk.selection_others) == (arch != "llama")
    again, recorder = resumed_then_asked(tmp_path / "s.ckv", QUESTIONS[2], arch)
    assert again == original and not recorder.of(Progress)  # nothing read again


def test_a_session_whose_store_is_gone_reads_the_document_and_conversation_again(doc, tmp_path):
    original = saved_then_asked(doc, tmp_path, 1)
    shutil.rmtree(list_stores(tmp_path / "stores")[0]["path"])
    again, recorder = resumed_then_asked(tmp_path / "s.ckv", QUESTIONS[1])
    assert again == original and recorder.of(Progress)
    assert "is gone (removed past the disk limit, or damaged): reading it and the conversation again" in notices(recorder)


def _rows_write_fails(monkeypatch):
    real_open = open

    def full_disk_open(path, mode="r", *args, **kwargs):
        if "a" in mode and ".conversations" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", full_disk_open)


def _setting_aside_fails(monkeypatch):
    def full_disk(path, caches):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(disk_cache, "write_caches", full_disk)


@pytest.mark.parametrize("arch, fail", [("llama", _rows_write_fails), ("gemma3_text", _setting_aside_fails)],
                         ids=["rows", "other-layers-set-aside"])
def test_a_full_disk_during_a_question_fails_in_one_line_and_the_chat_goes_on(doc, tmp_path, monkeypatch, arch, fail):
    """The question's rows, or (beside a sliding window) the other layers' caches where the
    disk's rows end, which go to disk after each selection: either write failing takes the
    question back whole."""
    expected, _ = chat(doc, arch, full_cache="memory")
    engine, recorder = start(ChatSettings(method="snapkv", budget="48", max_tokens=6, store_dir=str(tmp_path)), arch=arch)
    try:
        engine.open(doc)
        engine.ask(QUESTIONS[0])
        recorder.wait(Reply)
        fail(monkeypatch)
        engine.ask(QUESTIONS[1])
        failure = recorder.wait(Failure)[0]
        monkeypatch.undo()
        for question in QUESTIONS[1:]:
            engine.ask(question)
        recorder.wait(Reply, 3)
        answers = [t.answer_tokens for t in engine._document.turns]
    finally:
        engine.close()
    assert failure.text.startswith("cannot write the full cache to") and "the disk is full" in failure.text
    assert answers == expected  # the failed question was taken back whole


def test_an_8_bit_store_is_smaller_and_a_saved_chat_resumes_from_it_at_once(doc, tmp_path):
    def settings(**extra):
        return ChatSettings(method="snapkv", budget="48", max_tokens=6, store_dir=str(tmp_path / "stores"), **extra)

    engine, recorder = start(settings(store_bits=8, kv_group_size=32), head_dim=32)
    try:
        engine.open(doc)
        for question in QUESTIONS[:2]:
            engine.ask(question)
        recorder.wait(Reply, 2)
        engine.save(tmp_path / "s.ckv")
        recorder.wait(Saved)
        engine.ask(QUESTIONS[2])
        original = recorder.wait(Reply, 3)[2]
        packed = recorder.of(CacheView)[-1]
    finally:
        engine.close()
    engine, plain = start(settings(), head_dim=32)
    try:
        engine.open(doc)
        engine.ask(QUESTIONS[0])
        plain.wait(Reply)
    finally:
        engine.close()
    assert packed.disk_bytes > 0
    manifests = [json.loads((s["path"] / "manifest.json").read_text()) for s in list_stores(tmp_path / "stores")]
    sizes = sorted(sum(f["bytes"] for layer in m["layers"] for f in layer["files"].values()) for m in manifests)
    assert len(sizes) == 2 and sizes[0] == sizes[1] * (32 + 2 * 4) // (32 * 4)  # 8 bits + a float32 scale and bias per 32
    again, recorder = resumed_then_asked(tmp_path / "s.ckv", QUESTIONS[2], head_dim=32)
    assert again == original and not recorder.of(Progress)


def test_a_store_the_chat_read_is_the_one_generate_finds_at_the_edge_of_the_kv_limit(tmp_path, monkeypatch, capsys):
    """Under a limit of 768 rows the document alone fits and document + question does
    not: both tools size the read by the document (it is what the store holds)."""
    import ckv_mlx.model.models
    from ckv_mlx.generate import main
    from ckv_mlx.text.prompts import document_prefix, render
    from test_chat_engine import smollm_tokenizer, tiny_loader

    tokenizer, words = smollm_tokenizer(), DOC.split() * 20
    n = bisect.bisect(range(len(words)), 766, key=lambda n: len(document_prefix(tokenizer, " ".join(words[:n]))))
    text = " ".join(words[: n - 1])
    assert len(render(tokenizer, text, QUESTIONS[0], raw=False)) > 768
    path = tmp_path / "edge.txt"
    path.write_text(text)
    stores, limit = tmp_path / "stores", f"{768 * 512 // 1024}KiB"  # rows of 2 layers x 2 KV heads x 16 x (K, V) x 4 bytes
    _, recorder = chat(path, kv_limit=limit, store_dir=str(stores))
    monkeypatch.setattr(ckv_mlx.model.models, "load_model", lambda name=None, precision=None, identify=True, pipeline=False: tiny_loader()(name))
    assert main(["--doc", str(path), "--prompt", QUESTIONS[0], "--method", "snapkv", "--budget", "48",
                 "--kv-limit", limit, "--store-dir", str(stores), "--max-tokens", "4", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["store_reused"] and len(list_stores(stores)) == 1
