"""The full cache on disk: every question re-selects from it, and gets what
``per-question`` with the full cache in memory gets (the reference), on families mixing
kinds of layers too (plain mlx-lm the reference)."""

from collections import Counter

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache

from ckv_mlx.engine.conversation import Conversation
from ckv_mlx.disk.disk_cache import DiskFullCache
from ckv_mlx.engine.reselection import read_or_reuse
from ckv_mlx.errors import CKVError
from ckv_mlx.policy.methods import METHODS, make_method
from ckv_mlx.kv.quantized import KVBits
from ckv_mlx.engine.session import Session
from ckv_mlx.disk import store
from ckv_mlx.disk.store import StoreWriter
from fakes import fake_profile
from tiny import MIXED_ARGS, TinyTokenizer, as_mlx_lm_quantizes, mac_model, plain_logits, tiny_model

mx.random.seed(11)
DOC = mx.random.randint(1, 128, (150,)).tolist()
Q1, Q2 = [5, 6, 7, 8], [9, 10, 11]
TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2, "float16": 1e-2}


def session_for(method_name: str, dtype: str) -> Session:
    """A fresh tiny model (same weights each time) with its own session: window queries
    live in the model's attention, so the two conversations compared need two models."""
    model = tiny_model("llama", layers=3) if dtype == "float32" else mac_model("llama", dtype, layers=3)
    return Session(model, TinyTokenizer(), make_method(method_name, fake_profile(model))[0], region=16)


def in_memory(method_name: str, dtype: str, budget) -> Conversation:
    session = session_for(method_name, dtype)
    session.prefill(DOC)
    conversation = Conversation(session, "per-question", budget)
    conversation.open(session.snapshot())
    return conversation


def on_disk(method_name: str, dtype: str, budget, root) -> Conversation:
    session = session_for(method_name, dtype)
    writer = StoreWriter(root, "doc", len(session.caches))
    session.prefill(DOC, store=writer)
    store = writer.publish(session.remembered_queries())
    conversation = Conversation(session, "per-question", budget, DiskFullCache(store, root / "tails"))
    conversation.open()
    return conversation


def assert_same_selection(disk: Conversation, memory: Conversation, atol: float):
    for stored, kept in zip(disk.session.caches, memory.session.caches):
        assert stored.length == kept.length and stored.offset == kept.offset
        for a, b in zip(stored.keys_and_values(), kept.keys_and_values()):
            np.testing.assert_allclose(np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32)), atol=atol)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("method_name", sorted(METHODS))
def test_each_question_selects_what_the_full_cache_in_memory_selects(method_name, dtype, tmp_path):
    budget = None if method_name == "full" else 48
    memory, disk = in_memory(method_name, dtype, budget), on_disk(method_name, dtype, budget, tmp_path)
    atol = TOLERANCE[dtype]
    for question, n in ((Q1, 2), (Q2, 6)):  # the first answer and the second question fill less than the 8-query window
        expected, got = memory.start(question), disk.start(question)
        np.testing.assert_allclose(np.array(got.astype(mx.float32)), np.array(expected.astype(mx.float32)),
                                   atol=atol * 10, rtol=0)
        assert_same_selection(disk, memory, atol)
        answer = list(memory.session.generate(expected, n))
        assert list(disk.session.generate(got, n)) == answer
        memory.finish(answer)
        disk.finish(answer)
    assert disk.session.kv_bytes < disk.full_on_disk.nbytes or budget is None


def test_a_question_holds_at_most_one_layers_full_rows(tmp_path, monkeypatch):
    """Memory while re-selecting: the kept cache, plus one layer's full rows (read from
    disk a block at a time), never the whole full cache."""
    monkeypatch.setattr(store, "READ_BLOCK_ROWS", 128)
    model = tiny_model("llama", layers=8, heads=4, kv_heads=4, head_dim=32)
    session = Session(model, TinyTokenizer(), make_method("snapkv")[0], region=16)
    writer = StoreWriter(tmp_path, "doc", len(session.caches))
    session.prefill(mx.random.randint(1, 128, (2000,)).tolist(), store=writer)
    full = DiskFullCache(writer.publish(session.remembered_queries()), tmp_path / "tails")
    session.forget_rows()
    mx.clear_cache()
    held = mx.get_active_memory()
    mx.reset_peak_memory()
    mx.eval(session.reselect(Q1, full, 64))
    layer_rows = full.nbytes // 8  # keys and values of one layer, 2004 rows
    block = 2 * 128 * 4 * 32 * 4  # a block read and its transposed copy
    scoring = layer_rows // 2 + 3 * 4 * 8 * 2004 * 4  # the keys as scored, and window probabilities
    assert mx.get_peak_memory() - held <= session.kv_bytes + layer_rows + scoring + block
    assert mx.get_peak_memory() - held < full.nbytes / 3


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("arch", list(MIXED_ARGS))
def test_a_mixed_models_store_takes_its_other_layers_up_where_each_question_needs_them(arch, dtype, tmp_path):
    """A stored document reopened by another session, then two questions: each question
    reads against every row with the sliding windows and recurrent states where the
    disk's rows end, so its logits are plain mlx-lm's over the whole conversation."""
    def session():  # the same weights each time; each session its own model (see session_for)
        model = tiny_model(arch, layers=4) if dtype == "float32" else mac_model(arch, dtype, layers=4)
        return Session(model, TinyTokenizer(), make_method("snapkv")[0], region=16)

    first, notes = session(), []
    read_or_reuse(first, tmp_path, "doc", "doc", lambda writer: first.prefill(DOC, store=writer), notes.append)
    again = session()
    full = read_or_reuse(again, tmp_path, "doc", "doc", lambda writer: pytest.fail("read again"), notes.append)
    assert "was read before" in notes[-1] and set(again.others) == set(first.others)
    conversation = Conversation(again, "per-question", 40, full)
    conversation.open()
    read = list(DOC)
    for question in (Q1, Q2):
        read += question
        logits = conversation.start(question)
        expected = plain_logits(again.model, read, [])[0]
        np.testing.assert_allclose(np.array(logits.astype(mx.float32)), np.array(expected.astype(mx.float32)),
                                   atol=TOLERANCE[dtype] * 10, rtol=0)
        answer = list(again.generate(logits, 3))
        conversation.finish(answer)
        read += answer


def test_a_damaged_store_of_a_mixed_model_is_removed_and_read_again(tmp_path):
    model = tiny_model("gemma3_text", layers=4)
    session, notes = Session(model, TinyTokenizer(), make_method("snapkv")[0]), []
    read_or_reuse(session, tmp_path, "doc", "doc", lambda writer: session.prefill(DOC, store=writer), notes.append)
    others = tmp_path / "doc" / store.OTHERS
    data = bytearray(others.read_bytes())
    data[-1] ^= 0xFF
    others.write_bytes(bytes(data))
    read = []
    read_or_reuse(session, tmp_path, "doc", "doc", lambda writer: read.append(session.prefill(DOC, store=writer)),
                  notes.append)
    assert read and "was damaged (others.safetensors fails its checksum)" in notes[-1]


def test_questions_read_against_an_8_bit_store_see_its_rows_as_mx_quantize_packs_them(tmp_path):
    """Each question attends to the stored rows packed (the document's, then the earlier
    turns'), and to its own and the last answer's in full precision: plain mlx-lm with
    the same rows packed is the reference."""
    model = tiny_model("llama", layers=3, head_dim=32)
    session = Session(model, TinyTokenizer(), make_method("snapkv")[0], region=16)
    writer = StoreWriter(tmp_path, "doc", len(session.caches), KVBits(8, 32))
    session.prefill(DOC, store=writer)
    full = DiskFullCache(writer.publish(session.remembered_queries()), tmp_path / "tails")
    conversation = Conversation(session, "per-question", 48, full)
    conversation.open()
    plain, unread, packed = make_prompt_cache(model), [], 0
    for piece in (DOC[:-1], DOC[-1:]):  # as the session read it (rounding decides codes: the same calls)
        model(mx.array([piece]), cache=plain)
    for question in (Q1, Q2):
        as_mlx_lm_quantizes(plain, plain[0].offset, 8, 32, start=packed)  # what the store holds: every row read before
        packed = plain[0].offset
        expected = model(mx.array([unread + question]), cache=plain)[:, -1]
        logits = conversation.start(question)
        np.testing.assert_allclose(np.array(logits), np.array(expected), atol=1e-4, rtol=1e-4)
        unread = list(session.generate(logits, 3))
        conversation.finish(unread)
    assert full.nbytes == full.tokens * 3 * 2 * 2 * (32 + 2 * 4)  # layers x (K, V) x heads x (values, scale, bias)


def test_store_bits_the_heads_do_not_take_are_refused_before_anything_is_read(tmp_path):
    session = Session(tiny_model("llama", layers=2, head_dim=16), TinyTokenizer(), make_method("snapkv")[0])
    read = []
    with pytest.raises(CKVError, match="head size 16 is not a multiple of 32, the smallest group"):
        read_or_reuse(session, tmp_path, "doc", "the document", read.append, lambda text: None, kv_bits=KVBits(8))
    assert not read and not list(tmp_path.iterdir())  # nothing read, nothing left on disk


def test_a_long_question_reads_each_layer_from_disk_once(tmp_path, monkeypatch):
    """A question of several prefill steps against the stored document: one pass over the
    store, where memory allows (it read every layer once per 512 tokens), selecting what
    the full cache in memory selects."""
    question = mx.random.randint(1, 128, (1300,)).tolist()
    memory, disk = in_memory("snapkv", "float32", 48), on_disk("snapkv", "float32", 48, tmp_path)
    reads, real = Counter(), DiskFullCache.layer
    monkeypatch.setattr(DiskFullCache, "layer", lambda self, layer, room=0: reads.update([layer]) or real(self, layer, room))
    expected, got = memory.start(question), disk.start(question)
    assert dict(reads) == {layer: 1 for layer in range(3)}, reads
    np.testing.assert_allclose(np.array(got), np.array(expected), atol=1e-3, rtol=0)
    assert_same_selection(disk, memory, 1e-4)


def test_writing_and_reading_the_other_layers_caches_leaves_no_reference_cycle(tmp_path):
    """A cycle would keep every array of the saved caches alive until Python's cycle
    collector ran: at 32K tokens on Gemma, a second copy of its sliding windows at the
    peak of each selection (measured: 29 MiB over the target before this was fixed)."""
    import gc

    from mlx_lm.models.cache import RotatingKVCache

    from ckv_mlx.safetensors_file import read_caches, write_caches

    window = RotatingKVCache(max_size=8)
    window.update_and_fetch(mx.ones((1, 1, 12, 4)), mx.ones((1, 1, 12, 4)))
    gc.collect()
    gc.disable()
    try:
        write_caches(tmp_path / "others.safetensors", {3: window})
        back = read_caches(tmp_path / "others.safetensors")
        unreachable = gc.collect()
    finally:
        gc.enable()
    assert unreachable == 0
    assert back[3].offset == window.offset and mx.array_equal(back[3].state[0], window.state[0])
