"""ckv-serve's ``/metrics`` (Prometheus text, read with prometheus-client's own parser) and
``/openapi.json``: each figure checked against what the requests themselves reported and
what lies on disk, behind the server's key like every route but ``/health``."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
from mlx.utils import tree_flatten
from prometheus_client.parser import text_string_to_metric_families

from ckv_mlx.serve.worker import ServeSettings
from test_serve import MODEL, Server, body, messages, post

KEY = "sk-metrics"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    running = Server(ServeSettings(store_dir=tmp_path_factory.mktemp("metrics")), api_key=KEY)
    yield running
    running.stop()


def fetch(url: str, headers: dict | None = None) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=60) as response:
            return response.status, response.headers.get("Content-Type", ""), response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers.get("Content-Type", ""), error.read()


def samples(server) -> dict[tuple, float]:
    """Every sample of ``/metrics``, keyed by its name and labels."""
    code, kind, raw = fetch(server.url + "/metrics", AUTH)
    assert code == 200 and kind.startswith("text/plain"), (code, kind)
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(raw.decode()) for s in family.samples}


def requests(figures: dict, route: str, status: int) -> float:
    return figures.get(("ckv_requests_total", (("route", route), ("status", str(status)))), 0.0)


def stored_bytes(root) -> int:
    """What the published stores' files hold, counted on disk (manifests aside)."""
    return sum(f.stat().st_size for folder in root.iterdir() if folder.is_dir() and not folder.name.startswith(".")
               for f in folder.iterdir() if f.name != "manifest.json")


def test_metrics_count_what_the_requests_reported(server):
    before = samples(server)
    whole = server.client.chat.completions.create(model=MODEL, messages=messages("Row 4?"), max_tokens=5)
    streamed = server.client.chat.completions.create(model=MODEL, messages=messages("Row 5?"), max_tokens=5,
                                                     stream=True, stream_options={"include_usage": True})
    chunks = list(streamed)
    usage = [whole.usage, chunks[-1].usage]
    texts = [whole.choices[0].message.content, "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)]
    assert post(server.url + CHAT, body(temperature=9), AUTH)[0] == 400
    assert post(server.url + CHAT, body(), {"Authorization": "Bearer sk-wrong"})[0] == 401
    after = samples(server)

    def grew(name: str, labels: tuple = ()) -> float:
        return after.get((name, labels), 0.0) - before.get((name, labels), 0.0)

    assert requests(after, CHAT, 200) - requests(before, CHAT, 200) == 2
    assert requests(after, CHAT, 400) - requests(before, CHAT, 400) == 1
    assert requests(after, CHAT, 401) - requests(before, CHAT, 401) == 1
    assert grew("ckv_prompt_tokens_total") == sum(u.prompt_tokens for u in usage)
    assert grew("ckv_generated_tokens_total") == sum(u.completion_tokens for u in usage)
    assert grew("ckv_time_to_first_token_seconds_count") == sum(1 for t in texts if t)
    assert grew("ckv_generation_tokens_per_second_count") == 2
    assert after[("ckv_queue_waiting", ())] == 0
    assert after[("ckv_kv_cache_bytes", (("tier", "ram"),))] == 0  # nothing is being answered now
    disk = after[("ckv_kv_cache_bytes", (("tier", "disk"),))]
    assert disk == stored_bytes(server.worker.settings.store_dir) > 0  # the shared document was stored
    weights = sum(v.nbytes for _, v in tree_flatten(server.loaded.model.parameters()))
    active, peak = after[("ckv_mlx_memory_bytes", (("kind", "active"),))], after[("ckv_mlx_memory_bytes", (("kind", "peak"),))]
    assert weights <= active <= peak


def test_metrics_need_the_key_and_an_unknown_path_is_one_label(server):
    assert fetch(server.url + "/metrics")[0] == 401
    for path in ("/v1/a", "/v1/b", "/x"):
        assert fetch(server.url + path, AUTH)[0] == 404
    routes = {labels[0][1] for (name, labels) in samples(server) if name == "ckv_requests_total"}
    assert "/v1/a" not in routes and "other" in routes  # random paths cannot grow the metrics without bound


def test_the_openapi_document_carries_the_schema_the_server_checks(server):
    code, _, raw = fetch(server.url + "/openapi.json", AUTH)
    document = json.loads(raw)
    assert code == 200 and document["openapi"].startswith("3.1")
    chat = document["components"]["schemas"]["ChatBody"]
    assert set(chat["required"]) == {"model", "messages"}
    temperature = next(s for s in chat["properties"]["temperature"]["anyOf"] if s.get("type") == "number")
    assert (temperature["minimum"], temperature["maximum"]) == (0, 2)  # OpenAI's published range
    body_ref = document["paths"][CHAT]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert body_ref == "#/components/schemas/ChatBody"
    assert fetch(server.url + "/openapi.json")[0] == 401
