"""ckv-serve against fuzzed request bodies (Hypothesis): every answer is JSON in OpenAI's
error shape with a 4xx, or a completion; never a 5xx; and the server answers afterwards.
Bodies mix the fields we accept with wrong types, out-of-range numbers, nulls, lone
surrogates and unknown keys; answers are capped at 3 tokens so the loop stays short."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckv_mlx.policy.methods import METHODS
from ckv_mlx.serve.app import BackgroundServer, create_app
from ckv_mlx.serve.protocol import Limits
from ckv_mlx.serve.worker import ServeSettings, Worker
from fakes import fake_profile
from test_serve import DEFAULTS, MODEL, loaded_tiny

ANY_TEXT = st.text(st.characters(), max_size=12)  # surrogates included: JSON may carry them escaped
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True), ANY_TEXT)
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(ANY_TEXT, inner, max_size=3),
                    max_leaves=6)
VALID = {  # each field as OpenAI's schema allows it (answers capped at 3 tokens)
    "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "developer"]),
                                                "content": st.text(min_size=1, max_size=30)}), min_size=1, max_size=3),
    "prompt": st.text(min_size=1, max_size=30), "max_tokens": st.integers(1, 3) | st.none(),
    "temperature": st.floats(0, 2) | st.none(), "seed": st.integers(0, 2**64 - 1) | st.none(),
    "stop": st.lists(st.text(min_size=1, max_size=3), max_size=4) | st.none(), "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}) | st.none(),
    "n": st.sampled_from([1, None]),
    "ckv": st.fixed_dictionaries({}, optional={"method": st.sampled_from(["snapkv", "full", "compresskv+span4"]),
                                               "budget": st.sampled_from([48, "50%"])}),
}
EDGES = JSON | st.integers(-2**70, 2**70) | st.sampled_from(["\ud800", "a\udfffb", -1, 2**64, 0, "", [], {}, None])


@st.composite
def bodies(draw):
    """A body valid but for one or two fields (any key, any JSON value), or any JSON at all."""
    if draw(st.integers(0, 9)) == 0:
        return draw(JSON)
    body = {"model": MODEL, "messages": draw(VALID["messages"]), "prompt": draw(VALID["prompt"]),
            **draw(st.fixed_dictionaries({}, optional=VALID))}
    for _ in range(draw(st.integers(0, 2))):
        body[draw(st.sampled_from([*VALID, "model", "max_completion_tokens", "user"]) | ANY_TEXT)] = draw(EDGES)
    return body


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory):
    loaded = loaded_tiny()
    worker = Worker(loaded, fake_profile(loaded.model), ServeSettings(store_dir=tmp_path_factory.mktemp("fuzz")))
    http = BackgroundServer(create_app(worker, MODEL, DEFAULTS, list(METHODS), Limits(max_tokens=3)))
    yield http.url
    http.stop()
    worker.close()


def send(url: str, payload: bytes) -> tuple[int, str, bytes]:
    request = urllib.request.Request(url, data=payload, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.headers.get("Content-Type", ""), response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers.get("Content-Type", ""), error.read()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(body=bodies(), path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]))
def test_every_body_gets_a_4xx_in_openais_shape_or_a_completion(fuzzed, body, path):
    status, kind, raw = send(fuzzed + path, json.dumps(body).encode())
    assert status < 500, (status, raw[:300])
    if status >= 400:
        error = json.loads(raw)["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    elif kind.startswith("text/event-stream"):
        events = [line[len("data: "):] for line in raw.decode().splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and all("choices" in json.loads(e) for e in events[:-1]), raw[:300]
    else:
        assert json.loads(raw)["choices"], raw[:300]


def test_after_the_fuzzing_it_still_answers(fuzzed):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Which row grows plums?"}], "max_tokens": 2}
    status, _, raw = send(fuzzed + "/v1/chat/completions", json.dumps(body).encode())
    assert status == 200 and json.loads(raw)["choices"][0]["message"]["content"] is not None
