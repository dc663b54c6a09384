"""The document store on disk: exact rows, atomic publication, and nothing damaged,
half-written or foreign ever used."""

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from unittest.mock import patch

import mlx.core as mx
import numpy as np
import pytest

from ckv_mlx.disk.disk_cache import DiskFullCache
from ckv_mlx.errors import CKVError
from ckv_mlx.policy.methods import make_method
from ckv_mlx.engine.session import Session
from ckv_mlx.kv.quantized import KVBits
from ckv_mlx.safetensors_file import write_safetensors
from ckv_mlx.disk.store import (
    CONVERSATIONS, MANIFEST, DiskError, StoreCorrupt, StoreWriter, list_stores, open_store, prune, document_key,
)
from fakes import fake_profile
from tiny import TinyTokenizer, mac_model, tiny_model

ROOT = Path(__file__).resolve().parent.parent
DOC = list(range(1, 301))


def read_into_store(root, dtype="float32", key="doc", tokens=DOC):
    model = tiny_model("llama", layers=2) if dtype == "float32" else mac_model("llama", dtype, layers=2)
    session = Session(model, TinyTokenizer(), make_method("snapkv")[0])
    writer = StoreWriter(root, key, len(session.caches))
    session.prefill(tokens, store=writer)
    return session, writer


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_the_store_holds_every_row_of_the_full_cache_bit_for_bit(tmp_path, dtype):
    session, writer = read_into_store(tmp_path, dtype)
    store = writer.publish(session.remembered_queries())
    full = DiskFullCache(store, tmp_path / CONVERSATIONS)
    assert full.tokens == len(DOC)
    bits = mx.uint16 if dtype != "float32" else mx.uint32
    for layer, cache in enumerate(session.caches):
        for stored, held in zip(full.layer(layer), cache.keys_and_values()):
            assert stored.dtype == held.dtype
            assert np.array_equal(np.array(stored.view(bits)), np.array(held.view(bits)))
    for stored, held in zip(store.queries(), session.attentions):
        assert np.array_equal(np.array(stored.view(bits)), np.array(held.remembered().view(bits)))
    assert store.nbytes == session.kv_rows_bytes


def test_a_store_being_written_is_not_there_until_published(tmp_path):
    session, writer = read_into_store(tmp_path)
    assert open_store(tmp_path, "doc") is None and list_stores(tmp_path) == []
    writer.publish(session.remembered_queries())
    assert [s["key"] for s in list_stores(tmp_path)] == ["doc"]
    assert not list(tmp_path.glob(".tmp-*"))


def published(tmp_path) -> Path:
    session, writer = read_into_store(tmp_path)
    return writer.publish(session.remembered_queries()).path


def flip_a_byte(path: Path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def cut_short(path: Path):
    os.truncate(path, path.stat().st_size - 1)


@pytest.mark.parametrize("damage", [flip_a_byte, cut_short])
@pytest.mark.parametrize("name", ["001.keys", "000.values", "queries.safetensors"])
def test_a_damaged_store_is_detected_and_removed(tmp_path, damage, name):
    path = published(tmp_path)
    damage(path / name)
    with pytest.raises(StoreCorrupt, match=f"damaged .*{name}.* has been removed"):
        open_store(tmp_path, "doc")
    assert not path.exists()
    assert open_store(tmp_path, "doc") is None  # so the document is read again


@pytest.mark.parametrize("edit, why", [
    (lambda m: m.update(format="ckv-store/0"), "format 'ckv-store/0'"),
    (lambda m: m.update(key="another"), "format"),
    (None, "manifest is unreadable"),
])
def test_a_store_of_another_format_or_a_broken_manifest_is_never_used(tmp_path, edit, why):
    path = published(tmp_path)
    if edit is None:
        (path / MANIFEST).write_text('{"format": "ckv-st')
    else:
        manifest = json.loads((path / MANIFEST).read_text())
        edit(manifest)
        (path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(StoreCorrupt, match=why):
        open_store(tmp_path, "doc")
    assert not path.exists()


def test_the_key_changes_with_the_model_the_tokens_and_how_they_were_read():
    base = document_key("model-a", DOC)
    assert base == document_key("model-a", list(DOC))
    assert len({base, document_key("model-b", DOC), document_key("model-a", DOC[:-1]),
                document_key("model-a", DOC, 64, 512, "snapkv")}) == 4


def test_a_bounded_key_holds_the_profiles_content_not_its_file_name(tmp_path):
    from ckv_mlx.profiles import load_profile, save_profile

    model = tiny_model("llama", layers=2)
    one, other = fake_profile(model, seed=1), fake_profile(model, seed=2)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    save_profile(one, tmp_path / "a" / "tiny.json")
    save_profile(other, tmp_path / "b" / "tiny.json")  # another profile, the same file name
    save_profile(one, tmp_path / "copy.json")  # the same profile, another path
    keys = {name: document_key("m", DOC, 64, 512, "compresskv", load_profile(tmp_path / name))
            for name in ("a/tiny.json", "b/tiny.json", "copy.json")}
    assert keys["a/tiny.json"] != keys["b/tiny.json"] and keys["a/tiny.json"] == keys["copy.json"]
    assert document_key("m", DOC, profile=one) == document_key("m", DOC, profile=other)  # whole: no profile in it


def full_disk_writer(tmp_path):
    """A writer whose first file is /dev/full: every write fails with the kernel's ENOSPC."""
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full on this system")
    writer = StoreWriter(tmp_path, "doc", 2)
    (writer.folder / "000.keys").symlink_to("/dev/full")
    return writer


def test_a_full_disk_stops_the_store_not_the_reading(tmp_path):
    model = tiny_model("llama", layers=2)
    session = Session(model, TinyTokenizer(), make_method("snapkv")[0])
    writer = full_disk_writer(tmp_path)
    logits = session.prefill(DOC, store=writer)  # the document is still read into memory
    assert session.caches[0].length == len(DOC) and logits.shape[-1] == 128
    with pytest.raises(CKVError, match=r"^cannot write the full cache to .*: the disk is full; free some space"):
        writer.publish(session.remembered_queries())
    assert list(tmp_path.iterdir()) == []  # nothing half-written is left


def test_a_safetensors_file_on_a_full_disk_raises_instead_of_vanishing():
    """Given a path, MLX's writer drops a failed write without a word; every safetensors
    file we write (queries, other layers' caches, saved chats, converted weights) goes
    through ``write_safetensors``, which raises: the kernel's /dev/full is the full disk."""
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full on this system")
    with pytest.raises(OSError) as failure:
        write_safetensors("/dev/full", {"rows": mx.zeros((4096,))}, {"layout": "[]"})
    assert failure.value.errno == errno.ENOSPC


def test_a_full_tmpfs_is_reported_in_one_line(tmp_path):
    """The same on a real 256 KiB file system, where this machine lets us mount one."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        session, writer = read_into_store(mount, tokens=list(range(1, 1001)))  # 1000 rows x 2 layers: 512 KiB
        with pytest.raises(CKVError, match="the disk is full"):
            writer.publish(session.remembered_queries())
        assert list(mount.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_an_unwritable_folder_is_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(CKVError, match=r"^cannot write the full cache to .*file/stores: .*--store-dir"):
        StoreWriter(tmp_path / "file" / "stores", "doc", 2)


def test_the_second_of_two_writers_keeps_the_first_ones_store(tmp_path):
    first, first_writer = read_into_store(tmp_path)
    second, second_writer = read_into_store(tmp_path)
    first_writer.publish(first.remembered_queries())
    store = second_writer.publish(second.remembered_queries())
    assert store.path == tmp_path / "doc" and store.tokens == len(DOC)
    assert [p.name for p in tmp_path.iterdir()] == ["doc"]


WRITER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    from ckv_mlx.policy.methods import make_method
    from ckv_mlx.engine.session import Session
    from ckv_mlx.disk.store import StoreWriter, open_store
    from tiny import TinyTokenizer, tiny_model
    session = Session(tiny_model("llama", layers=2), TinyTokenizer(), make_method("snapkv")[0])
    writer = StoreWriter({root!r}, "doc", 2)
    session.prefill(list(range(1, 2001)), store=writer)
    store = writer.publish(session.remembered_queries())
    assert open_store({root!r}, "doc") is not None  # checked in full
    print(store.tokens)
""")


def test_two_processes_reading_the_same_new_document_both_end_with_a_sound_store(tmp_path):
    script = WRITER.format(tests=str(ROOT / "tests"), root=str(tmp_path))
    runs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [run.communicate(timeout=300)[0].strip() for run in runs]
    assert [run.returncode for run in runs] == [0, 0] and outputs == ["2000", "2000"]
    assert [p.name for p in tmp_path.iterdir()] == ["doc"]
    assert open_store(tmp_path, "doc").tokens == 2000


def test_least_recently_used_stores_go_past_the_limit(tmp_path):
    for key in ("a", "b", "c"):
        session, writer = read_into_store(tmp_path, key=key)
        writer.publish(session.remembered_queries())
    size = list_stores(tmp_path)[0]["bytes"]
    os.utime(tmp_path / "a" / MANIFEST, (1, 1))  # a: used longest ago
    open_store(tmp_path, "b")  # b: used last
    assert prune(tmp_path, 2 * size + size // 2) == ["a"]
    assert [s["key"] for s in list_stores(tmp_path)] == ["b", "c"]


def test_leftovers_of_dead_writers_are_cleared(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = dead.stdout.strip()
    (tmp_path / f".tmp-doc-{pid}-abcd1234").mkdir()
    (tmp_path / CONVERSATIONS / f"{pid}-abcd1234").mkdir(parents=True)
    (tmp_path / f".tmp-doc-{os.getpid()}-abcd1234").mkdir()  # a live writer's: kept
    prune(tmp_path, 2**30)
    assert [p.name for p in tmp_path.glob(".tmp-*")] == [f".tmp-doc-{os.getpid()}-abcd1234"]
    assert list((tmp_path / CONVERSATIONS).iterdir()) == []


def test_an_interrupted_question_takes_its_rows_back_off_the_disk(tmp_path):
    session, writer = read_into_store(tmp_path)
    full = DiskFullCache(writer.publish(session.remembered_queries()), tmp_path / CONVERSATIONS)
    session.forget_rows()
    session.reselect([5, 6, 7], full, 32)
    sizes = {p.name: p.stat().st_size for p in full.tail.folder.iterdir()}

    def interrupt(*args):
        raise KeyboardInterrupt

    session.attentions[1].tap = interrupt  # the second layer is interrupted after the first wrote its rows
    with pytest.raises(KeyboardInterrupt):
        session.reselect([8, 9], full, 32)
    assert {p.name: p.stat().st_size for p in full.tail.folder.iterdir()} == sizes
    assert full.tokens == len(DOC) + 3


def test_a_full_disk_during_a_question_is_one_line_and_loses_nothing(tmp_path, monkeypatch):
    session, writer = read_into_store(tmp_path)
    full = DiskFullCache(writer.publish(session.remembered_queries()), tmp_path / CONVERSATIONS)
    session.forget_rows()
    real_open = open

    def full_disk_open(path, mode="r", *args, **kwargs):
        if "a" in mode:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", full_disk_open)
    with pytest.raises(CKVError, match="^cannot write the full cache to .*the disk is full"):
        session.reselect([5, 6, 7], full, 32)
    monkeypatch.undo()
    assert full.tokens == len(DOC)
    session.reselect([5, 6, 7], full, 32)  # once there is room again
    assert full.tokens == len(DOC) + 3


def test_the_stores_cli_lists_prunes_and_clears(tmp_path, capsys):
    from ckv_mlx.stores import main

    for key in ("a", "b"):
        session, writer = read_into_store(tmp_path, key=key)
        writer.publish(session.remembered_queries())
    assert main(["--dir", str(tmp_path)]) == 0
    listed = capsys.readouterr().out
    assert listed.startswith(f"2 stores in {tmp_path}") and "      300 tokens" in listed
    assert main(["--dir", str(tmp_path), "clear", "nope"]) == 2
    assert "no store nope" in capsys.readouterr().err
    assert main(["--dir", str(tmp_path), "prune", "--limit", "1KiB"]) == 0 and len(list_stores(tmp_path)) == 0
    session, writer = read_into_store(tmp_path, key="c")
    writer.publish(session.remembered_queries())
    assert main(["--dir", str(tmp_path), "clear", "c"]) == 0 and list_stores(tmp_path) == []


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_store_kept_8_bit_holds_each_row_as_mx_quantize_packs_it(tmp_path, dtype):
    kv_bits = KVBits(8, 32)
    model = tiny_model("llama", layers=2, head_dim=32) if dtype == "float32" else mac_model("llama", dtype, layers=2,
                                                                                            head_dim=32)
    session = Session(model, TinyTokenizer(), make_method("snapkv")[0])
    writer = StoreWriter(tmp_path, "doc", len(session.caches), kv_bits)
    session.prefill([t % 127 + 1 for t in DOC], store=writer)  # in the tiny vocabulary: finite rows
    store = writer.publish(session.remembered_queries())
    full = DiskFullCache(store, tmp_path / CONVERSATIONS)
    for layer, cache in enumerate(session.caches):
        for stored, held in zip(full.layer(layer), cache.keys_and_values()):
            expected = mx.dequantize(*mx.quantize(held, group_size=32, bits=8), group_size=32, bits=8)
            assert stored.dtype == held.dtype and mx.array_equal(stored, expected) and mx.all(mx.isfinite(held))
    width = {"float32": 4, "bfloat16": 2}[dtype]
    packed_row = 2 * (32 + 2 * width)  # 2 KV heads x (32 bytes of values, a scale and a bias)
    assert store.nbytes == len(DOC) * 2 * 2 * packed_row  # layers x (keys, values)
    assert store.nbytes < 0.6 * session.kv_rows_bytes if dtype == "bfloat16" else store.nbytes < 0.33 * session.kv_rows_bytes
    assert store.kv_bits == kv_bits and json.loads((store.path / "manifest.json").read_text())["kv_bits"] == {
        "bits": 8, "group_size": 32}


def test_a_store_packed_with_other_bits_is_never_taken_for_one_without(tmp_path):
    assert document_key("m", DOC) != document_key("m", DOC, kv_bits=KVBits(8))
    model = tiny_model("llama", layers=2, head_dim=32)
    session = Session(model, TinyTokenizer(), make_method("snapkv")[0])
    writer = StoreWriter(tmp_path, "doc", len(session.caches), KVBits(8, 32))
    session.prefill(DOC, store=writer)
    writer.publish(session.remembered_queries())
    with pytest.raises(StoreCorrupt, match="its rows are stored 8-bit, not as computed"):
        open_store(tmp_path, "doc")
    assert open_store(tmp_path, "doc") is None  # removed


def test_a_store_in_use_is_never_pruned_under_its_reader(tmp_path):
    session, writer = read_into_store(tmp_path, key="a")
    full = DiskFullCache(writer.publish(session.remembered_queries()), tmp_path / CONVERSATIONS)
    assert prune(tmp_path, 0) == [] and open_store(tmp_path, "a") is not None  # leased by the reader
    full.close()
    assert prune(tmp_path, 0) == ["a"]


def test_every_publish_prunes_to_the_limit_and_keeps_what_it_published(tmp_path):
    for key in ("a", "b"):
        session, writer = read_into_store(tmp_path, key=key)
        writer.publish(session.remembered_queries())
    size = list_stores(tmp_path)[0]["bytes"]
    os.utime(tmp_path / "a" / MANIFEST, (1, 1))
    model = tiny_model("llama", layers=2)
    session = Session(model, TinyTokenizer(), make_method("snapkv")[0])
    writer = StoreWriter(tmp_path, "c", len(session.caches), limit_bytes=2 * size + size // 2)
    session.prefill(DOC, store=writer)
    writer.publish(session.remembered_queries())
    assert sorted(s["key"] for s in list_stores(tmp_path)) == ["b", "c"]


def test_reading_a_store_marks_it_used(tmp_path):
    session, writer = read_into_store(tmp_path, key="a")
    full = DiskFullCache(writer.publish(session.remembered_queries()), tmp_path / CONVERSATIONS)
    os.utime(tmp_path / "a" / MANIFEST, (1, 1))
    session.forget_rows()
    session.reselect([7, 8, 9], full, 64)
    assert (tmp_path / "a" / MANIFEST).stat().st_mtime > 1
    full.close()


def test_a_store_removed_under_its_reader_is_not_called_a_full_disk(tmp_path):
    session, writer = read_into_store(tmp_path, key="a")
    full = DiskFullCache(writer.publish(session.remembered_queries()), tmp_path / CONVERSATIONS)
    shutil.rmtree(tmp_path / "a")  # by hand
    session.forget_rows()
    with pytest.raises(CKVError, match="was removed while in use") as error:
        session.reselect([7, 8, 9], full, 64)
    assert "disk is full" not in str(error.value) and "free some space" not in str(error.value)


def test_a_manifest_of_another_format_breaks_no_listing_and_no_prune(tmp_path):
    session, writer = read_into_store(tmp_path, key="ours")
    writer.publish(session.remembered_queries())
    (tmp_path / "future").mkdir()
    (tmp_path / "future" / MANIFEST).write_text(json.dumps({"format": "ckv-store/9", "key": "future", "tokens": 5}))
    assert [s["key"] for s in list_stores(tmp_path)] == ["ours"]
    assert prune(tmp_path, 0) == ["ours"] and (tmp_path / "future").is_dir()  # not ours to remove


def test_a_store_is_checksummed_once_per_process_and_file_identity(tmp_path, monkeypatch):
    import ckv_mlx.disk.store as store_module

    session, writer = read_into_store(tmp_path, key="a")
    writer.publish(session.remembered_queries())
    checked = []
    real = store_module._check
    monkeypatch.setattr(store_module, "_check", lambda path, record: checked.append(path.name) or real(path, record))
    for _ in range(3):
        assert open_store(tmp_path, "a") is not None
    files = len(checked)
    assert files and files == len(set(checked))  # each file once, not once per open
    keys = tmp_path / "a" / "000.keys"
    data = bytearray(keys.read_bytes())
    data[-1] ^= 0xFF
    keys.write_bytes(bytes(data))  # changed on disk (same size): checked again, and caught
    os.utime(keys, (1, 1))
    with pytest.raises(StoreCorrupt):
        open_store(tmp_path, "a")


def test_a_store_larger_than_the_limit_is_refused_and_the_root_never_exceeds_it(tmp_path):
    session, writer = read_into_store(tmp_path, key="a")
    writer.publish(session.remembered_queries())
    size = list_stores(tmp_path)[0]["bytes"]
    session, writer = read_into_store(tmp_path / "small", key="b")
    writer.limit_bytes = size - 1
    with pytest.raises(DiskError, match="larger than the store's limit .* raise --store-limit"):
        writer.publish(session.remembered_queries())
    assert list_stores(tmp_path / "small") == [] and not list((tmp_path / "small").glob(".tmp-*"))
    session, writer = read_into_store(tmp_path, key="c")  # room made before it appears: never 2 stores at once
    writer.limit_bytes = size + size // 2
    seen = []
    real_rename = os.rename
    with patch.object(os, "rename", lambda a, b: seen.append(sum(s["bytes"] for s in list_stores(tmp_path)))
                      or real_rename(a, b)):
        writer.publish(session.remembered_queries())
    assert seen == [0] and [s["key"] for s in list_stores(tmp_path)] == ["c"]
