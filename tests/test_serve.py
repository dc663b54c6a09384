"""ckv-serve on 127.0.0.1 through the official ``openai`` client: answers equal to the
engine's for the same settings, streaming, every bad request refused with its code and
the server still serving, a bounded load test, and a shared prefix read once."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from email.message import Message
from pathlib import Path

import mlx.core as mx
import pytest

from ckv_mlx.policy.methods import METHODS, make_method
from ckv_mlx.model.models import LoadedModel
from ckv_mlx.kv.quantized import KVBits
from ckv_mlx.serve import protocol
from ckv_mlx.serve.app import BackgroundServer, create_app
from ckv_mlx.serve.protocol import Compression, Limits
from ckv_mlx.serve.worker import ServeSettings, Worker
from ckv_mlx.engine.memory import plan_prefill
from ckv_mlx.engine.session import PREFILL_STEP, Session
from fakes import fake_profile, tiny_shape
from test_chat_engine import smollm_tokenizer
from tiny import mac_model, tiny_model

openai = pytest.importorskip("openai")

MODEL = "tiny"
DOCUMENT = " ".join(f"Item {i}: the orchard on row {i} grows {['apples', 'pears', 'plums'][i % 3]}." for i in range(60))
MAX_BODY = 64 * 1024
DEFAULTS = Compression("snapkv", "48")
LIMITS = Limits(max_tokens=512, max_body_bytes=MAX_BODY)


def loaded_tiny(context: int = 4096, model=None) -> LoadedModel:
    model = model or tiny_model("llama", layers=2, vocab=49152)
    return LoadedModel(model, smollm_tokenizer(), MODEL, tiny_shape(model), context, identity="tiny-serve")


def client_of(url: str, api_key: str | None = None):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=api_key or "unused", max_retries=0, timeout=120)


class Server:
    """ckv-serve on a free loopback port, in a thread, for one test module."""

    def __init__(self, settings: ServeSettings, model=None, api_key: str | None = None):
        self.loaded = loaded_tiny(model=model)
        self.profile = fake_profile(self.loaded.model)
        self.worker = Worker(self.loaded, self.profile, settings)
        self.http = BackgroundServer(create_app(self.worker, MODEL, DEFAULTS, list(METHODS), LIMITS, api_key))
        self.url = self.http.url
        self.client = client_of(self.url, api_key)

    def stop(self):
        self.http.stop()
        self.worker.close()


def post(url: str, body: bytes, headers: dict | None = None) -> tuple[int, Message, dict]:
    """POST ``body`` as JSON: the status, the headers (any case) and the JSON answer."""
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.headers, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, error.headers, json.loads(error.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    running = Server(ServeSettings(store_dir=tmp_path_factory.mktemp("stores")))
    yield running
    running.stop()


def messages(question: str, document: str = DOCUMENT) -> list[dict]:
    return [{"role": "system", "content": document}, {"role": "user", "content": question}]


def engine_answer(server: Server, tokens: list[int], method: str, budget: int, max_tokens: int,
                  working: int | None = None, kv_bits: KVBits | None = None) -> str:
    """What the engine answers for the same prompt and settings, the cache in memory
    (read in chunks keeping ``working`` tokens per layer between them, if given)."""
    session = Session(server.loaded.model, server.loaded.tokenizer, make_method(method, server.profile)[0],
                      kv_bits=kv_bits)
    try:
        logits = session.prefill(tokens, working_budget=working)
        session.compress(budget)
        detokenizer = server.loaded.tokenizer.detokenizer  # as a streaming server decodes (mlx-lm's own server too)
        for token in session.generate(logits, max_tokens):
            detokenizer.add_token(token)
        detokenizer.finalize()
        return detokenizer.text
    finally:
        session.reset()


def chat_tokens(server: Server, chat: list[dict]) -> list[int]:
    return list(server.loaded.tokenizer.apply_chat_template(chat, add_generation_prompt=True))


def test_a_chat_answers_as_the_engine_does_and_reports_its_cache(server):
    chat = messages("Which fruit grows on row 7?")
    reply = server.client.chat.completions.create(model=MODEL, messages=chat, max_tokens=8)
    tokens = chat_tokens(server, chat)
    assert reply.choices[0].message.content == engine_answer(server, tokens, "snapkv", 48, 8)
    assert reply.object == "chat.completion" and reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens == len(tokens) and reply.usage.completion_tokens <= 8
    figures = reply.model_extra["ckv"]
    assert figures["method"] == "snapkv" and figures["budget"] == 48
    assert 0 < figures["kv_bytes_kept"] < figures["kv_bytes_full"]


def test_a_stream_says_what_the_whole_answer_says(server):
    chat = messages("Which fruit grows on row 12?")
    whole = server.client.chat.completions.create(model=MODEL, messages=chat, max_tokens=8)
    chunks = list(server.client.chat.completions.create(model=MODEL, messages=chat, max_tokens=8, stream=True,
                                                        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completions_whole_and_streamed(server):
    prompt = DOCUMENT + "\nQuestion: which fruit grows on row 4? Answer:"
    whole = server.client.completions.create(model=MODEL, prompt=prompt, max_tokens=6)
    tokens = server.loaded.tokenizer.encode(prompt)
    assert whole.choices[0].text == engine_answer(server, tokens, "snapkv", 48, 6)
    streamed = "".join(c.choices[0].text for c in server.client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=6, stream=True))
    assert streamed == whole.choices[0].text


def test_per_request_compression_overrides_the_servers(server):
    chat = messages("Which fruit grows on row 9?")
    reply = server.client.chat.completions.create(model=MODEL, messages=chat, max_tokens=6,
                                                  extra_body={"ckv": {"method": "streamingllm", "budget": 40}})
    assert reply.model_extra["ckv"]["method"] == "streamingllm" and reply.model_extra["ckv"]["budget"] == 40
    assert reply.choices[0].message.content == engine_answer(server, chat_tokens(server, chat), "streamingllm", 40, 6)


@pytest.mark.parametrize("server_bits", [None, 4])
def test_kv_bits_are_the_servers_for_compressing_requests_and_never_for_full(tmp_path, server_bits):
    """Not asked for, a compressing request's kept rows take the server's --kv-bits (8
    when none is given); a full-cache request inherits nothing, and 16 is as computed."""
    server = Server(ServeSettings(kv_bits=server_bits), model=tiny_model("llama", layers=2, vocab=49152, head_dim=32))
    try:
        chat = messages("Which fruit grows on row 5?")

        def bits_of(ckv: dict | None) -> int | None:
            reply = server.client.chat.completions.create(model=MODEL, messages=chat, max_tokens=4,
                                                          extra_body={"ckv": ckv} if ckv else None)
            return reply.model_extra["ckv"]["kv_bits"]

        expected = server_bits or 8
        assert bits_of(None) == expected and bits_of({"method": "full"}) is None
        assert bits_of({"kv_bits": 16}) is None and bits_of({"kv_bits": 4 if expected == 8 else 8}) != expected
        reply = server.client.chat.completions.create(model=MODEL, messages=chat, max_tokens=6)
        assert reply.choices[0].message.content == engine_answer(server, chat_tokens(server, chat), "snapkv", 48, 6,
                                                                 kv_bits=KVBits(expected))
    finally:
        server.stop()


def test_stop_strings_cut_the_answer_where_they_begin(server):
    chat = messages("Which fruit grows on row 3?")
    full = server.client.chat.completions.create(model=MODEL, messages=chat, max_tokens=12).choices[0].message.content
    stop = full[3:5]
    assert stop, full
    cut = server.client.chat.completions.create(model=MODEL, messages=chat, max_tokens=12, stop=[stop])
    assert cut.choices[0].message.content == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in server.client.chat.completions.create(
        model=MODEL, messages=chat, max_tokens=12, stop=stop, stream=True) if c.choices)
    assert streamed == cut.choices[0].message.content


def test_a_seeded_sample_repeats(server):
    chat = messages("Name a fruit.")
    answers = {server.client.chat.completions.create(model=MODEL, messages=chat, max_tokens=8, temperature=1.0,
                                                     seed=7).choices[0].message.content for _ in range(2)}
    assert len(answers) == 1


def test_models_and_health(server):
    assert [m.id for m in server.client.models.list().data] == [MODEL]
    with urllib.request.urlopen(f"{server.url}/health", timeout=10) as response:
        assert json.loads(response.read())["status"] == "ok"


def body(**fields) -> bytes:
    return json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], **fields}).encode()


@pytest.mark.parametrize("path, payload, status, words", [
    ("/v1/chat/completions", b"{not json", 400, "not valid JSON"),
    ("/v1/chat/completions", b"[1, 2]", 400, "must be a JSON object"),
    ("/v1/chat/completions", json.dumps({"messages": []}).encode(), 400, "'model' is required"),
    ("/v1/chat/completions", body(model="gpt-4o"), 404, "does not exist: this server serves 'tiny'"),
    ("/v1/chat/completions", json.dumps({"model": MODEL}).encode(), 400, "'messages' is required: a non-empty list"),
    ("/v1/chat/completions", body(messages=[{"role": "robot", "content": "x"}]), 400,
     "'messages[0].role' must be one of system, user, assistant, developer, not 'robot'"),
    ("/v1/chat/completions", body(max_tokens=-3), 400, "'max_tokens' must be a positive integer"),
    ("/v1/chat/completions", body(max_tokens=10**9), 400, "more than this server allows (512)"),
    ("/v1/chat/completions", body(temperature=7), 400, "'temperature' must be a number from 0 to 2"),
    ("/v1/chat/completions", body(stop=[1, 2]), 400, "'stop' must be a string"),
    ("/v1/chat/completions", body(ckv={"budget": 4}), 400, "budget 4 is too small"),
    ("/v1/chat/completions", body(ckv={"method": "magic"}), 400, "unknown method 'magic'"),
    ("/v1/chat/completions", body(ckv={"method": "snapkv+span"}), 400, "unknown option 'span'"),
    ("/v1/chat/completions", body(ckv={"method": ["snapkv"]}), 400, "'ckv.method' must be a method name"),
    ("/v1/chat/completions", body(ckv={"bits": 4}), 400, "'ckv' has no field 'bits'"),
    ("/v1/chat/completions", body(n=2), 400, "'n' must be 1"),
    ("/v1/chat/completions", body(messages=[{"role": "user", "content": [{"type": "image_url"}]}]), 400,
     "'messages[0].content' must be a string or a list of text parts"),
    ("/v1/chat/completions", body(ckv={"method": "full", "kv_bits": 4}), 400, "--method full keeps every row"),
    ("/v1/completions", json.dumps({"model": MODEL, "prompt": ""}).encode(), 400, "'prompt' must be a non-empty"),
    ("/v1/chat/completions", body(messages=[{"role": "user", "content": "x" * (MAX_BODY + 10)}]), 413, "over this"),
    ("/v1/chat/completions", body(messages=[{"role": "user", "content": "pear " * 5000}], max_tokens=8), 400,
     "over the model's context of 4,096"),
    ("/v1/nothing", body(), 404, "/v1/nothing"),
    ("/v1/chat/completions", body(stream=True, stream_options="yes"), 400, "'stream_options' must be an object"),
    ("/v1/chat/completions", body(seed=-1), 400, "'seed' must be an integer from 0 to 2**64 - 1"),
    ("/v1/chat/completions", body(seed=2**64), 400, "'seed' must be an integer from 0 to 2**64 - 1"),
    ("/v1/completions", b'{"model": "tiny", "prompt": "a \\ud800 b"}', 400, "not valid Unicode (a lone surrogate"),
    ("/v1/chat/completions", b'{"model": "tiny", "messages": [{"role": "user", "content": "\\udfff"}]}', 400,
     "not valid Unicode"),
    ("/v1/chat/completions", b'{"model": "\\ud800", "messages": []}', 400, "not valid Unicode"),
])
def test_bad_requests_get_openai_errors_and_the_server_serves_on(server, path, payload, status, words):
    code, _, answer = post(server.url + path, payload)
    assert code == status and words in answer["error"]["message"], answer
    assert set(answer["error"]) == {"message", "type", "param", "code"}
    assert server.client.chat.completions.create(model=MODEL, messages=messages("Row 1?"), max_tokens=2).choices


def test_the_openai_client_sees_the_error_too(server):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        server.client.chat.completions.create(model="gpt-4o", messages=messages("Hi"), max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="context_length_exceeded|over the model's context"):
        server.client.chat.completions.create(model=MODEL, messages=messages("x", "pear " * 5000), max_tokens=2)


def test_a_shared_prefix_is_read_once_and_the_next_request_reads_only_its_question(server):
    document = DOCUMENT + " The packing shed is run by Ines Varga."
    first = server.client.chat.completions.create(model=MODEL, messages=messages("Who runs the shed?", document),
                                                  max_tokens=6)
    again = server.client.chat.completions.create(model=MODEL, messages=messages("Who runs the shed?", document),
                                                  max_tokens=6)
    assert first.model_extra["ckv"]["prefix_tokens_reused"] == 0
    assert again.model_extra["ckv"]["prefix_tokens_reused"] >= 256
    assert again.choices[0].message.content == first.choices[0].message.content


def test_eight_clients_fifty_requests_answer_as_one_at_a_time_and_memory_goes_back(server):
    questions = [f"Which fruit grows on row {i}?" for i in range(10)]
    serial = {q: server.client.chat.completions.create(model=MODEL, messages=messages(q), max_tokens=4)
              .choices[0].message.content for q in questions}
    mx.synchronize()
    idle = mx.get_active_memory()

    def ask(i: int) -> tuple[str, str]:
        q = questions[i % len(questions)]
        return q, server.client.chat.completions.create(model=MODEL, messages=messages(q), max_tokens=4).choices[0].message.content

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(50), timeout=600))
    assert len(answers) == 50 and all(answer == serial[q] for q, answer in answers)
    time.sleep(0.5)
    mx.synchronize()
    assert mx.get_active_memory() <= idle + 2**20


def test_a_client_that_leaves_mid_stream_stops_its_answer(server, monkeypatch):
    seen, submit = [], server.worker.submit

    def recorded(request, emit):
        events = []
        job = submit(request, lambda event: (events.append(event), emit(event)))
        seen.append((job, events))
        return job

    monkeypatch.setattr(server.worker, "submit", recorded)
    stream = server.client.chat.completions.create(model=MODEL, messages=messages("Tell me about the rows."),
                                                   max_tokens=500, stream=True)
    next(iter(stream))
    stream.close()
    (job, events), = seen
    deadline = time.monotonic() + 60
    while not events or events[-1][0] != "done":
        assert time.monotonic() < deadline, "the answer did not end"
        time.sleep(0.05)
    assert job.cancelled.is_set() and events[-1][2]["completion_tokens"] < 500  # stopped, not run to the end
    assert server.client.chat.completions.create(model=MODEL, messages=messages("Row 2?"), max_tokens=2).choices


@pytest.mark.slow
def test_the_built_in_model_answers_what_generate_answers(default_model, tmp_path, capsys):
    """Chat streamed and whole, and a completion, each equal to ``generate``'s answer
    (chat-templated, and ``--raw``) on the built-in model with its shipped profile."""
    from ckv_mlx.generate import main as generate
    from ckv_mlx.profiles import resolve_profile

    document = tmp_path / "doc.txt"
    document.write_text(" ".join(["The orchard manager is Helena Marsh.", DOCUMENT]))
    question = "Who is the orchard manager?"

    def generated(*raw: str) -> str:
        assert generate(["--doc", str(document), "--prompt", question, "--method", "compresskv", "--budget", "64",
                         "--max-tokens", "10", "--json", "--store-dir", str(tmp_path / "generate"), *raw]) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["text"]

    expected_chat, expected_raw = generated(), generated("--raw")
    profile, path, _ = resolve_profile(None, default_model.shape)
    worker = Worker(default_model, profile, ServeSettings(store_dir=tmp_path / "serve"))
    http = BackgroundServer(create_app(worker, default_model.name, Compression("compresskv", "64"), list(METHODS)))
    try:
        client = client_of(http.url)
        ask = dict(model=default_model.name, max_tokens=10)
        chat = [{"role": "user", "content": f"{document.read_text()}\n\n{question}"}]  # as generate renders it
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            messages=chat, stream=True, **ask) if c.choices)
        whole = client.chat.completions.create(messages=chat, **ask).choices[0].message.content
        completion = client.completions.create(prompt=f"{document.read_text()}\n{question}", **ask).choices[0].text
    finally:
        http.stop()
        worker.close()
    assert streamed == whole == expected_chat and whole.strip()
    assert completion == expected_raw and completion.strip()


def test_a_full_queue_is_told_to_retry_and_the_waiting_request_is_answered(server):
    """With the model busy and one request waiting (the most allowed), the next gets
    429 with Retry-After; the waiting one is answered once the model is free."""
    http = BackgroundServer(create_app(server.worker, MODEL, DEFAULTS, list(METHODS), Limits(512, MAX_BODY, 1)))
    release, running = threading.Event(), threading.Event()

    def hold(event):  # the running job's first event keeps the MLX thread until released
        if not running.is_set():
            running.set()
            release.wait(60)

    try:
        server.worker.submit(protocol.parse(body(max_tokens=2), "chat", MODEL, DEFAULTS, 512, list(METHODS)), hold)
        assert running.wait(60)
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(client_of(http.url).chat.completions.create, model=MODEL,
                                  messages=messages("Row 5?"), max_tokens=2)
            deadline = time.monotonic() + 60
            while server.worker.waiting < 1:
                assert time.monotonic() < deadline and not waiting.done(), "the request never queued"
                time.sleep(0.02)
            code, headers, answer = post(f"{http.url}/v1/chat/completions", body())
            assert code == 429 and headers["Retry-After"] == "1", answer
            assert "server is busy: 1 requests are waiting" in answer["error"]["message"]
            assert answer["error"]["type"] == "rate_limit_error" and answer["error"]["code"] == "server_busy"
            release.set()
            assert waiting.result(timeout=120).choices[0].message.content is not None
    finally:
        release.set()
        http.stop()
    assert server.client.chat.completions.create(model=MODEL, messages=messages("Row 6?"), max_tokens=2).choices


@pytest.mark.parametrize("stored", [False, True], ids=["in-memory", "stored"])
def test_a_kv_limit_reads_the_prompt_in_chunks_and_answers_as_the_engine(tmp_path, stored):
    """Under ``--kv-limit`` a prompt whose full cache would not fit is read in chunks
    that compress as they go: the answer is the engine's read the same way. With the
    store, the full cache goes to disk and the question selects from all of it."""
    server = Server(ServeSettings(store_dir=tmp_path if stored else None))
    try:
        chat = messages("Which fruit grows on row 8?")
        tokens = chat_tokens(server, chat)
        limit = (48 + PREFILL_STEP + 40) * server.loaded.kv_bytes_per_token
        working, _ = plan_prefill(server.loaded, len(tokens), 48, str(limit), PREFILL_STEP)
        assert working == 88  # the prompt's full cache does not fit: 88 rows kept between chunks
        server.worker.settings.kv_limit = str(limit)
        reply = server.client.chat.completions.create(model=MODEL, messages=chat, max_tokens=6)
        expected = engine_answer(server, tokens, "snapkv", 48, 6, working=None if stored else working)
        assert reply.choices[0].message.content == expected
        if stored:  # the second request reads only its question, from the full cache on disk
            again = server.client.chat.completions.create(model=MODEL, messages=chat, max_tokens=6)
            assert again.model_extra["ckv"]["prefix_tokens_reused"] > 256
            assert again.choices[0].message.content == expected
        server.worker.settings.kv_limit = str(40 * server.loaded.kv_bytes_per_token)
        with pytest.raises(openai.BadRequestError, match="KV memory limit .* is too small for budget 48"):
            server.client.chat.completions.create(model=MODEL, messages=chat, max_tokens=6)
    finally:
        server.stop()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_mac_model_is_served_as_the_engine_answers(tmp_path, dtype):
    """Weights kept 4-bit, activations and KV in half precision, as on a Mac: whole and
    streamed answers equal the engine's in the same dtype, and a stored prefix reused."""
    server = Server(ServeSettings(store_dir=tmp_path), model=mac_model("llama", dtype, layers=2, vocab=49152))
    try:
        chat = messages("Which fruit grows on row 10?")
        whole = server.client.chat.completions.create(model=MODEL, messages=chat, max_tokens=8)
        assert whole.choices[0].message.content == engine_answer(server, chat_tokens(server, chat), "snapkv", 48, 8)
        streamed = "".join(c.choices[0].delta.content or "" for c in server.client.chat.completions.create(
            model=MODEL, messages=chat, max_tokens=8, stream=True) if c.choices)
        assert streamed == whole.choices[0].message.content
        assert streamed and whole.model_extra["ckv"]["prefix_tokens_reused"] == 0
        figures = server.client.chat.completions.create(model=MODEL, messages=chat, max_tokens=8).model_extra["ckv"]
        assert figures["prefix_tokens_reused"] > 256 and 0 < figures["kv_bytes_kept"] < figures["kv_bytes_full"]
    finally:
        server.stop()


@pytest.mark.parametrize("args, words", [
    (["--kv-bits", "4", "--method", "full"], "--method full keeps every row"),
    (["--max-body", "lots"], "not a memory size"),
    (["--max-tokens", "0"], "--max-tokens must be at least 1"),
    (["--max-waiting", "-1"], "--max-waiting must be 0 or more"),
])
def test_bad_flags_are_one_line_before_any_model_loads(capsys, args, words):
    from ckv_mlx.serve.cli import main

    assert main(args) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1


def test_a_growing_conversation_reads_only_each_new_turn(server):
    document = DOCUMENT + " The cold store opened in 1998."
    chat = messages("When did the cold store open?", document)
    first = server.client.chat.completions.create(model=MODEL, messages=chat, max_tokens=5)
    chat += [{"role": "assistant", "content": first.choices[0].message.content},
             {"role": "user", "content": "And the packing shed?"}]
    second = server.client.chat.completions.create(model=MODEL, messages=chat, max_tokens=5)
    chat += [{"role": "assistant", "content": second.choices[0].message.content},
             {"role": "user", "content": "Which rows grow plums?"}]
    third = server.client.chat.completions.create(model=MODEL, messages=chat, max_tokens=5)
    tokens = chat_tokens(server, chat)
    system, through_first = (len(list(server.loaded.tokenizer.apply_chat_template(chat[:k]))) for k in (1, 3))
    assert second.model_extra["ckv"]["prefix_tokens_reused"] == system  # the document's; its first turn now stored
    assert third.model_extra["ckv"]["prefix_tokens_reused"] == through_first  # read: the second turn, the question
    assert third.choices[0].message.content == engine_answer(server, tokens, "snapkv", 48, 5)


def test_the_full_cache_figure_is_the_prompts_whatever_the_answers_length(server):
    from ckv_mlx.kv.cache import allocated_rows

    words = server.loaded.tokenizer.encode(DOCUMENT)[:240]
    prompt = server.loaded.tokenizer.decode(words)
    tokens = len(server.loaded.tokenizer.encode(prompt))
    assert 200 < tokens < 256 - 8
    prompts_full = server.loaded.kv_bytes_per_token * allocated_rows(tokens)  # 256 rows, as mlx-lm's KVCache grows
    for max_tokens in (1, 60):
        body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "ckv": {"method": "full"}}
        status, _, reply = post(f"{server.url}/v1/completions", json.dumps(body).encode())
        assert status == 200 and reply["ckv"]["kv_bytes_full"] == prompts_full, (max_tokens, reply["usage"])


def test_a_growing_conversation_keeps_the_store_folder_within_its_limit(tmp_path):
    from ckv_mlx.disk.store import list_stores

    limit = 400_000
    running = Server(ServeSettings(store_dir=tmp_path / "stores", store_limit=limit))
    try:
        chat = messages("When did the cold store open?", DOCUMENT + " The cold store opened in 1998.")
        for turn in range(6):
            reply = running.client.chat.completions.create(model=MODEL, messages=chat, max_tokens=3)
            chat += [{"role": "assistant", "content": reply.choices[0].message.content},
                     {"role": "user", "content": f"And row {turn}?"}]
            stores = list_stores(tmp_path / "stores")
            assert sum(s["bytes"] for s in stores) <= limit, (turn, [s["bytes"] for s in stores])
    finally:
        running.stop()


def test_null_n_and_max_tokens_are_openais_defaults(server):
    for fields in ({"n": None}, {"max_tokens": None}, {"n": None, "max_tokens": None, "seed": 2**64 - 1}):
        code, _, answer = post(f"{server.url}/v1/chat/completions", body(**fields))
        assert code == 200 and answer["choices"][0]["message"]["content"] is not None, (fields, answer)


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    running = Server(ServeSettings(store_dir=tmp_path_factory.mktemp("keyed")), api_key="sk-local-test")
    yield running
    running.stop()


def get(url: str, headers: dict | None = None) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.mark.parametrize("headers, words", [
    ({}, "no API key"), ({"Authorization": "Bearer sk-wrong"}, "incorrect API key"),
    ({"Authorization": "sk-local-test"}, "no API key"), ({"Authorization": "Basic sk-local-test"}, "no API key"),
])
def test_with_a_key_every_route_but_health_needs_it(keyed, headers, words):
    for path in ("/v1/models", "/v1/nothing"):
        code, answer = get(keyed.url + path, headers)
        assert code == 401 and words in answer["error"]["message"], (path, answer)
        assert answer["error"]["code"] == "invalid_api_key" and set(answer["error"]) == {"message", "type", "param", "code"}
    code, _, answer = post(f"{keyed.url}/v1/chat/completions", body(), headers)
    assert code == 401 and answer["error"]["type"] == "invalid_request_error"
    assert get(keyed.url + "/health")[0] == 200


def test_with_the_key_the_openai_client_is_answered(keyed):
    reply = keyed.client.chat.completions.create(model=MODEL, messages=messages("Row 3?"), max_tokens=2)
    assert reply.choices[0].message.content is not None
    with pytest.raises(openai.AuthenticationError, match="incorrect API key"):
        client_of(keyed.url, "sk-wrong").models.list()


@pytest.mark.parametrize("args, words", [
    (["--host", "0.0.0.0"], "without an API key"),
    (["--host", "192.168.1.20", "--api-key", ""], "without an API key"),
])
def test_listening_beyond_loopback_without_a_key_is_refused_before_any_model_loads(capsys, monkeypatch, args, words):
    from ckv_mlx.serve.cli import main

    monkeypatch.delenv("CKV_API_KEY", raising=False)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert words in err and "--allow-unauthenticated" in err and len(err.strip().splitlines()) == 1


def test_the_key_may_come_from_the_environment(monkeypatch):
    from ckv_mlx.serve.cli import parse_args, server_key

    monkeypatch.setenv("CKV_API_KEY", "sk-env")
    assert server_key(parse_args(["--host", "0.0.0.0"])) == "sk-env"
    assert server_key(parse_args(["--host", "0.0.0.0", "--api-key", "sk-flag"])) == "sk-flag"
    monkeypatch.delenv("CKV_API_KEY")
    assert server_key(parse_args(["--host", "::", "--allow-unauthenticated"])) is None
    assert server_key(parse_args(["--host", "localhost"])) is None


def test_a_long_body_of_short_messages_renders_the_template_a_bounded_number_of_times(server, monkeypatch):
    tokenizer = server.loaded.tokenizer
    real, calls = type(tokenizer).apply_chat_template, []
    monkeypatch.setattr(type(tokenizer), "apply_chat_template",
                        lambda self, *a, **kw: calls.append(len(a[0])) or real(self, *a, **kw))
    chat = [{"role": "system", "content": DOCUMENT}]
    for i in range(200):
        chat += [{"role": "user", "content": f"Row {i}?"}, {"role": "assistant", "content": "Plums."}]
    chat.append({"role": "user", "content": "Row 7?"})
    code, _, answer = post(f"{server.url}/v1/chat/completions", json.dumps({"model": MODEL, "messages": chat,
                                                                             "max_tokens": 1}).encode())
    assert code in (200, 400), answer  # answered, or refused for the context: either way after a bounded search
    assert len(calls) <= 8, len(calls)


def test_a_disk_error_is_a_507_that_names_no_server_path(server, monkeypatch):
    import errno

    from ckv_mlx.disk.store import disk_error
    from ckv_mlx.engine.session import Session as EngineSession

    def full_disk(self, *args, **kwargs):
        raise disk_error(Path("/srv/secret-stores"), OSError(errno.ENOSPC, "No space left on device"))

    monkeypatch.setattr(EngineSession, "reselect", full_disk)
    chat = messages("Which fruit grows on row 9?")  # a document prefix: read into the store, then selected from it
    code, _, answer = post(f"{server.url}/v1/chat/completions", json.dumps({"model": MODEL, "messages": chat,
                                                                             "max_tokens": 2}).encode())
    assert code == 507 and "the disk is full" in answer["error"]["message"], answer
    assert "/srv" not in answer["error"]["message"] and "--store-dir" not in answer["error"]["message"]
    assert set(answer["error"]) == {"message", "type", "param", "code"}
