"""Compression across a group of processes, as ``mlx.launch`` starts them over several
Macs, here over loopback (``--backend ring`` on 127.0.0.1): split by heads (tensor
parallel) or by layers (pipeline parallel), the group keeps what one process keeps, in
the same bytes, and answers the same. Every launch is bounded in time."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.utils import save_model

import group_worker
from fakes import fake_profile
from ckv_mlx.disk.store import layer_files
from ckv_mlx.errors import CKVError
from ckv_mlx.policy.methods import METHODS
from ckv_mlx.profiles import save_profile
from tiny import model_of, plain_greedy, tiny_config

LAUNCH = Path(sys.executable).with_name("mlx.launch")
WORKER = Path(__file__).with_name("group_worker.py")
HAYSTACK = Path(__file__).parents[1] / "ckv_mlx" / "data" / "haystack" / "01-learning-a-craft.txt"
BOUND_S = 240  # the most a launch may take before the test fails (and its processes are killed)
VOCAB = 49152  # the built-in tokenizer's
EVERY_METHOD = [*METHODS, "compresskv-gqa+span8+word48"]
COMPRESSED, WHOLE = 64, 1024  # tokens per layer: a 300-token prompt cut, and kept whole


def builtin_tokenizer_files() -> Path:
    from ckv_mlx.model.gguf import builtin_model_folder

    try:
        return builtin_model_folder()
    except CKVError as e:
        pytest.skip(f"built-in model unavailable (its tokenizer is the tiny models'): {e}")


def tiny_folder(folder: Path, arch: str, quantized: str | None = None, **shape) -> Path:
    """A tiny random model as an mlx-lm folder (with the built-in model's tokenizer); with
    ``quantized`` (a dtype name) its weights 4-bit, the rest in that dtype, as on a Mac."""
    config = {**tiny_config(arch, vocab=VOCAB, **shape), "max_position_embeddings": 8192}
    model = model_of(config)
    if quantized:
        nn.quantize(model, group_size=32, bits=4)
        model.set_dtype(getattr(mx, quantized))
        config.update(quantization={"group_size": 32, "bits": 4}, torch_dtype=quantized)
    save_model(folder, model)
    (folder / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(builtin_tokenizer_files() / name, folder / name)
    return folder


def free_port(ranks: int) -> int:
    """A port from which ``ranks`` ports are free (the ring listens on one per rank)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + ranks < 65536 and all(_free(port + i) for i in range(ranks)):
            return port
    raise RuntimeError("no free ports")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def launch(ranks: int, *command: str, bound: float = BOUND_S, env: dict | None = None) -> subprocess.Popen:
    """``mlx.launch --backend ring -n ranks python command...`` on 127.0.0.1 (one rank:
    ``python command...`` alone), in a process group of its own (to be killed whole)."""
    launcher = [str(LAUNCH), "--backend", "ring", "-n", str(ranks), "--starting-port", str(free_port(ranks))]
    return subprocess.Popen(
        [*launcher * (ranks > 1), sys.executable, *command],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})


def finished(process: subprocess.Popen, bound: float = BOUND_S) -> tuple[str, str]:
    """The launch's stdout and stderr once it ends; killed whole and failed past ``bound`` s."""
    try:
        return process.communicate(timeout=bound)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        pytest.fail(f"the group did not end within {bound} s:\n{err[-3000:]}")


def group_run(tmp_path: Path, ranks: int, folder: Path, methods: list[str], budgets: list[int], mode: str,
              precision: str, profile: Path) -> list[tuple[dict, dict]]:
    out = tmp_path / f"group-{mode}-{precision}"
    process = launch(ranks, str(WORKER), str(folder), ",".join(methods), ",".join(map(str, budgets)), str(out), mode,
                     precision, str(profile))
    _, err = finished(process)
    assert all((out / f"rank{r}.json").is_file() for r in range(ranks)), err[-3000:]
    return [(json.loads((out / f"rank{r}.json").read_text()), dict(np.load(out / f"rank{r}.npz")))
            for r in range(ranks)]


def one_process(tmp_path, folder, methods, budgets, precision, profile) -> tuple[dict, dict]:
    out = tmp_path / f"one-{precision}"
    group_worker.run(str(folder), methods, budgets, out, precision=precision, profile=str(profile))
    return json.loads((out / "rank0.json").read_text()), dict(np.load(out / "rank0.npz"))


def group_keys(ranks: list[tuple[dict, dict]], key: str, mode: str) -> np.ndarray:
    """One layer's kept keys as one process holds them: the ranks' KV heads side by side
    (tensor), or the rows of the rank holding the layer (pipeline)."""
    held = [(meta["first_kv"], kept[key]) for meta, kept in ranks if key in kept]
    if mode == "pipeline":
        assert len(held) == 1, f"{key}: held by {len(held)} ranks"
        return held[0][1]
    return np.concatenate([keys for _, keys in sorted(held, key=lambda h: h[0])], axis=1)


def shared_rows(a: np.ndarray, b: np.ndarray, tolerance: float) -> float:
    """The share of ``a``'s kept rows (keys, ``[1, kv_heads, rows, d]``) that ``b`` keeps too, head by head."""
    close = np.abs(a[0][:, :, None, :] - b[0][:, None, :, :]).max(axis=-1) <= tolerance
    return close.any(axis=-1).mean()


def check_same_as_one_process(group, one, methods, mode, tolerance, least_shared=1.0):
    """The group's tokens, bytes and budgets are one process's; each layer keeps the same
    rows, or (``least_shared``, in half precision, where the ranks' partial sums round
    otherwise) at least that share of them, in bytes within 5 % (per-head budgets follow
    the scores)."""
    meta, kept = one
    for name in methods:
        for budget in (COMPRESSED, WHOLE):
            run = f"{name}/{budget}"
            assert [m["runs"][run]["tokens"] for m, _ in group] == [meta["runs"][run]["tokens"]] * len(group), run
            assert sum(m["runs"][run]["kv_bytes"] for m, _ in group) == \
                pytest.approx(meta["runs"][run]["kv_bytes"], rel=0 if least_shared == 1.0 else 0.05), run
            assert all(m["runs"][run]["budgets"] == meta["runs"][run]["budgets"] for m, _ in group), run
            for layer in range(len(meta["layers"])):
                key, ours = f"{run}/{layer}", group_keys(group, f"{run}/{layer}", mode)
                if least_shared == 1.0:
                    np.testing.assert_allclose(ours, kept[key], atol=tolerance, err_msg=key)
                else:
                    assert shared_rows(ours, kept[key], tolerance) >= least_shared, key


@pytest.fixture(scope="module")
def tensor_model(tmp_path_factory):
    """A llama of 4 query heads and 2 KV heads per layer: one KV head and its 2 query heads per rank."""
    return tiny_folder(tmp_path_factory.mktemp("llama"), "llama", layers=3, heads=4, kv_heads=2)


@pytest.fixture(scope="module")
def profile_of(tmp_path_factory):
    def made(folder: Path, seed: int = 3) -> Path:
        from ckv_mlx.model.models import load_model

        profile = fake_profile(load_model(str(folder), "float32", identify=False).model, seed, name=str(folder))
        path = tmp_path_factory.mktemp("profile") / "profile.json"
        save_profile(profile, path)
        return path
    return made


def test_split_by_heads_keeps_and_answers_as_one_process(tmp_path, tensor_model, profile_of):
    profile = profile_of(tensor_model)
    srh = [json.loads(profile.read_text())["srh"][layer][:2] for layer in range(3)]
    groups = [{h // 2 for h in heads} for heads in srh]
    assert {0, 1} in groups and any(len(g) == 1 for g in groups), \
        "the profile must give some layer SRHs in one KV head's group only (the other takes the mean of all)"
    group = group_run(tmp_path, 2, tensor_model, EVERY_METHOD, [COMPRESSED, WHOLE], "tensor", "float32", profile)
    one = one_process(tmp_path, tensor_model, EVERY_METHOD, [COMPRESSED, WHOLE], "float32", profile)
    assert [m["first_kv"] for m, _ in group] == [0, 1]
    assert all("split over several processes" in m["make_prompt_cache_refused"] for m, _ in group)
    assert one[0]["make_prompt_cache_refused"] is None
    check_same_as_one_process(group, one, EVERY_METHOD, "tensor", 1e-4)
    plain = plain_greedy(model_of({**tiny_config("llama", layers=3, heads=4, kv_heads=2, vocab=VOCAB),
                                   "max_position_embeddings": 8192}), group_worker.PROMPT, group_worker.ANSWER)
    assert group[0][0]["runs"][f"full/{WHOLE}"]["tokens"] == plain


@pytest.fixture(scope="module")
def pipeline_model(tmp_path_factory):
    """A qwen2 of 4 layers (mlx-lm pipelines qwen2): 2 layers per rank."""
    return tiny_folder(tmp_path_factory.mktemp("qwen2"), "qwen2", layers=4, heads=4, kv_heads=2)


def test_split_by_layers_keeps_and_answers_as_one_process(tmp_path, pipeline_model, profile_of):
    """qwen2 over 2 ranks by layers: rank 0 runs the last 2, rank 1 the first 2; each
    layer's budget and SRHs are those of its number in the whole model."""
    folder = pipeline_model
    profile = profile_of(folder)
    group = group_run(tmp_path, 2, folder, EVERY_METHOD, [COMPRESSED, WHOLE], "pipeline", "float32", profile)
    one = one_process(tmp_path, folder, EVERY_METHOD, [COMPRESSED, WHOLE], "float32", profile)
    assert [m["layers"] for m, _ in group] == [[2, 3], [0, 1]]
    assert all("split over several processes" in m["make_prompt_cache_refused"] for m, _ in group)
    assert len(set(one[0]["runs"][f"compresskv/{COMPRESSED}"]["budgets"])) > 1, "error-aware budgets differ by layer"
    check_same_as_one_process(group, one, EVERY_METHOD, "pipeline", 1e-4)


@pytest.mark.parametrize("dtype", ["bfloat16"])
def test_split_by_heads_on_a_mac_model(tmp_path_factory, tmp_path, profile_of, dtype):
    """As a Mac runs it: 4-bit weights kept quantized, activations and KV in ``dtype``.
    Nothing to evict, the group answers as plain mlx-lm does over the whole model; cut,
    it keeps the same bytes as one process and answers the same. Its kept rows differ
    where bfloat16 rounds the ranks' partial sums otherwise and random weights score
    tokens nearly alike."""
    folder = tiny_folder(tmp_path_factory.mktemp("mac"), "llama", quantized=dtype, layers=3, heads=4, kv_heads=2)
    profile = profile_of(folder)
    methods = ["full", "compresskv", "compresskv-gqa+span8+word48", "snapkv-ada"]
    group = group_run(tmp_path, 2, folder, methods, [COMPRESSED, WHOLE], "tensor", "native", profile)
    one = one_process(tmp_path, folder, methods, [COMPRESSED, WHOLE], "native", profile)
    check_same_as_one_process(group, one, methods, "tensor", 0.15, least_shared=0.6)
    from ckv_mlx.model.models import load_model

    plain = plain_greedy(load_model(str(folder), "native", identify=False).model, group_worker.PROMPT,
                         group_worker.ANSWER)
    assert group[0][0]["runs"][f"full/{WHOLE}"]["tokens"] == plain


def generate(ranks: int, *args: str, bound: float = BOUND_S) -> tuple[dict, str]:
    """``python -m ckv_mlx.generate ... --json`` over ``ranks`` processes: rank 0's report
    and the launch's stderr."""
    out, err = finished(launch(ranks, "-m", "ckv_mlx.generate", *args, "--json"), bound)
    lines = out.strip().splitlines()
    assert lines and lines[-1].startswith("{"), err[-3000:]
    return json.loads(lines[-1]), err


def one_generate(*args: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "ckv_mlx.generate", *args, "--json"], capture_output=True, text=True,
                          timeout=BOUND_S, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


GROUP_FIGURES = ("text", "kv_bytes_full", "kv_bytes_kept", "kv_rows_kept", "layer_budgets", "prompt_tokens")


@pytest.mark.slow
def test_generate_over_three_ranks_answers_as_one_process():
    """The built-in SmolLM2 (9 query heads, 3 KV heads), split by heads over 3 ranks."""
    builtin_tokenizer_files()
    args = ["--doc", str(HAYSTACK), "--prompt", "What does the essay say about learning a craft?", "--max-tokens",
            "8", "--no-store"]
    group, err = generate(3, *args)
    one = one_generate(*args)
    assert {k: group[k] for k in GROUP_FIGURES} == {k: one[k] for k in GROUP_FIGURES}, err[-2000:]
    assert group["ranks"] == 3 and len(group["kv_bytes_kept_per_rank"]) == 3
    assert sum(group["kv_bytes_kept_per_rank"]) == group["kv_bytes_kept"]
    assert "ranks            3" in err  # the summary, printed once (rank 0)
    assert err.count("prompt tokens") == 1


def test_a_model_the_group_cannot_split_is_refused_before_loading(tmp_path):
    """9 query heads and 3 KV heads over 2 ranks: each rank says so in one line and exits 2."""
    folder = tiny_folder(tmp_path / "odd", "llama", layers=2, heads=9, kv_heads=3)
    (folder / "model.safetensors").write_bytes(b"not weights")  # never read: the refusal comes first
    out, err = finished(launch(2, "-m", "ckv_mlx.generate", "--model", str(folder), "--doc", str(HAYSTACK)))
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 2 and "9 query heads and 3 KV heads cannot be split evenly over 2 processes: use 1 or 3" \
        in lines[0], err[-2000:]
    assert "Traceback" not in err


def test_the_store_is_per_rank_and_a_missing_part_makes_every_rank_read_again(tmp_path, tensor_model):
    stores = tmp_path / "stores"
    args = ["--model", str(tensor_model), "--doc", str(HAYSTACK), "--prompt", "What?", "--budget", "64",
            "--max-tokens", "6", "--store-dir", str(stores)]
    first, _ = generate(2, *args)
    parts = sorted(p for p in stores.iterdir() if not p.name.startswith((".", "conversations")))
    assert not first["store_reused"] and len(parts) == 2  # one store per rank
    again, _ = generate(2, *args)
    assert again["store_reused"] and again["text"] == first["text"] and again["kv_bytes_kept"] == first["kv_bytes_kept"]
    for part in parts:  # each rank's part gone in turn: the whole group reads again, never a mix
        shutil.rmtree(part)
        read, err = generate(2, *args)
        assert not read["store_reused"] and read["text"] == first["text"], err[-2000:]
        assert all(p.is_dir() for p in parts)  # stored again
    layer = parts[1] / layer_files(0)[0]
    layer.write_bytes(b"\0" * layer.stat().st_size)  # a corrupt part
    read, err = generate(2, *args)
    assert not read["store_reused"] and read["text"] == first["text"], err[-2000:]


def test_a_rank_killed_mid_answer_ends_the_others_in_one_line(tmp_path, tensor_model):
    process = launch(2, "-m", "ckv_mlx.generate", "--model", str(tensor_model), "--doc", str(HAYSTACK), "--prompt",
                     "What?", "--budget", "64", "--max-tokens", "4000", "--no-store")
    follower = None
    deadline = time.monotonic() + BOUND_S
    while follower is None and time.monotonic() < deadline:
        follower = next((pid for pid in _descendants(process.pid) if _rank_of(pid) == "1"), None)
        time.sleep(0.2)
    assert follower is not None, "rank 1 never started"
    time.sleep(8)  # into the answer
    os.kill(follower, signal.SIGKILL)
    start = time.monotonic()
    _, err = finished(process, bound=60)
    assert time.monotonic() - start < 60
    assert "Traceback" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) <= 1 and all("another process of the group stopped" in e for e in errors), err[-3000:]


def _descendants(pid: int) -> list[int]:
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def _rank_of(pid: int) -> str | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    return next((e.split(b"=", 1)[1].decode() for e in env if e.startswith(b"MLX_RANK=")), None)


@pytest.mark.parametrize("mode", ["tensor", "pipeline"])
def test_the_chat_engine_over_a_group_answers_as_one_process(tmp_path, tensor_model, pipeline_model, mode):
    """The app's engine on rank 0, the other rank following its jobs: the same answers to
    two questions, and the panel's bytes are the group's (one process's)."""
    folder = str(tensor_model if mode == "tensor" else pipeline_model)
    args = [folder, str(HAYSTACK), "What is the essay about?|And then?"]
    _, err = finished(launch(2, str(WORKER), "chat", *args, str(tmp_path / "group"), mode))
    group_worker.chat(folder, str(HAYSTACK), args[2].split("|"), tmp_path / "one")
    group = json.loads((tmp_path / "group" / "chat.json").read_text())
    assert group == json.loads((tmp_path / "one" / "chat.json").read_text()), err[-2000:]
    assert len(group["replies"]) == 2 and not group["failures"]


def _serve_answers(url: str, questions: list[str]) -> list[dict]:
    import urllib.request

    deadline = time.monotonic() + BOUND_S
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                break
        except OSError:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.3)
    with urllib.request.urlopen(url + "/v1/models", timeout=10) as response:
        model = json.loads(response.read())["data"][0]["id"]
    document = HAYSTACK.read_text()[:3000]
    answers = []
    for question in questions:
        payload = {"model": model, "messages": [{"role": "system", "content": document},
                                              {"role": "user", "content": question}], "max_tokens": 6}
        request = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(payload).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(request, timeout=BOUND_S) as response:
            answer = json.loads(response.read())
        answers.append({"text": answer["choices"][0]["message"]["content"], "usage": answer["usage"],
                        "ckv": answer["ckv"]})
    return answers


@pytest.mark.parametrize("mode", ["tensor", "pipeline"])
def test_ckv_serve_over_a_group_answers_as_one_process_and_stops_whole(tmp_path, tensor_model, pipeline_model, mode):
    """Rank 0 serves HTTP, the other rank its requests: a document read and stored, then
    asked about again from the store; the same answers and bytes as one process. SIGTERM
    to rank 0 ends every rank."""
    folder = str(tensor_model if mode == "tensor" else pipeline_model)
    questions = ["What is the essay about?", "Who is it for?"]
    answers = {}
    for ranks in (1, 2):
        port = free_port(1)
        command = ["-m", "ckv_mlx.serve.cli", "--model", folder, "--port", str(port), "--budget", "64",
                   "--store-dir", str(tmp_path / f"stores{ranks}")]
        command += ["--pipeline"] * (mode == "pipeline")
        process = launch(ranks, *command)
        try:
            answers[ranks] = _serve_answers(f"http://127.0.0.1:{port}", questions)
            leader = process.pid if ranks == 1 else next(pid for pid in _descendants(process.pid) if _rank_of(pid) == "0")
            os.kill(leader, signal.SIGTERM)
            _, err = finished(process, bound=60)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
        assert "Traceback" not in err, err[-3000:]
    assert answers[2] == answers[1]
    assert answers[2][1]["ckv"]["prefix_tokens_reused"] > 0  # the second question read the document from the store


@pytest.mark.parametrize("config, ranks, pipeline, says", [
    ({"model_type": "llama", "num_hidden_layers": 4, "num_attention_heads": 4}, 2, True,
     "mlx-lm cannot split a llama model by layers (--pipeline) (it can split qwen2, qwen3_moe, ministral3, "
     "qwen3_next, qwen3_5): split it by heads (tensor parallel)"),
    ({"model_type": "gemma3_text", "num_hidden_layers": 4, "num_attention_heads": 4}, 2, False,
     "mlx-lm cannot split a gemma3_text model by heads (tensor parallel) (it can split llama, mistral, qwen2, qwen3, "
     "qwen3_moe, ministral3, gpt_oss, qwen3_5): run it on one machine"),
    ({"model_type": "qwen2", "num_hidden_layers": 2, "num_attention_heads": 4}, 3, True,
     "2 layers cannot be split over 3 processes: use at most 2"),
    ({"model_type": "qwen2", "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 4}, 3, False,
     "8 query heads and 4 KV heads cannot be split evenly over 3 processes: use 1 or 2 or 4 processes"),
])
def test_what_mlx_lm_cannot_split_is_refused_in_one_line(config, ranks, pipeline, says):
    from ckv_mlx.group.sharding import check_shardable

    with pytest.raises(CKVError) as refused:
        check_shardable(config, "m", ranks, pipeline)
    assert says in str(refused.value) and "\n" not in str(refused.value)


def test_a_hybrid_model_split_by_layers_numbers_its_attention_layers_over_the_whole_model(tmp_path_factory, tmp_path,
                                                                                         profile_of):
    """qwen3_next (linear attention, full attention every 2nd layer) over 2 ranks by
    layers: each rank holds one of the 2 compressing layers, numbered 0 and 1 in the whole
    model, and PyramidKV's budgets fall by that number."""
    folder = tiny_folder(tmp_path_factory.mktemp("qwen3_next"), "qwen3_next", layers=4, heads=4, kv_heads=2)
    profile, methods = profile_of(folder), ["compresskv", "pyramidkv", "snapkv-ada"]
    group = group_run(tmp_path, 2, folder, methods, [COMPRESSED, WHOLE], "pipeline", "float32", profile)
    one = one_process(tmp_path, folder, methods, [COMPRESSED, WHOLE], "float32", profile)
    assert [m["layers"] for m, _ in group] == [[1], [0]]
    budgets = one[0]["runs"][f"pyramidkv/{COMPRESSED}"]["budgets"]
    assert len(budgets) == 2 and budgets[0] > budgets[1]
    check_same_as_one_process(group, one, methods, "pipeline", 1e-4)
