"""REST API through FastAPI's TestClient, on the tiny random-weight model (seconds)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from blendrag.api.app import create_app

QUESTION = "Who kept the Saint Orvo lighthouse?"


@pytest.fixture(scope="module")
def index_dir(new_sample_index) -> Path:
    return new_sample_index("api-index")


@pytest.fixture(scope="module")
def client(tiny_engine, index_dir) -> TestClient:
    with TestClient(create_app(tiny_engine, index_dir)) as client:
        yield client


def sse_events(text: str) -> list[tuple[str | None, str]]:
    """(event name, data) of each server-sent event."""
    events = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.split("\n"))
        events.append((fields.get("event"), fields["data"]))
    return events


def test_query_answers_with_chunks_and_stats(client):
    r = client.post("/query", json={"question": QUESTION, "top_k": 3, "max_tokens": 6})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["answer"]
    assert [c["doc_id"] for c in body["chunks"]][0] == "saint_orvo_lighthouse.md"
    assert len(body["chunks"]) == 3 and all(c["id"] is not None and c["text"] for c in body["chunks"])
    stats = body["stats"]
    assert stats["n_tokens"] > stats["n_recomputed"] > 0
    assert stats["cache_hits"] == 3 and stats["cache_misses"] == 0  # KV precomputed at index time
    assert stats["ttft_s"] > 0 and stats["mode"] == "blend"
    assert r.headers["x-request-id"]


def test_query_stream_sends_pieces_then_done(client):
    body = {"question": QUESTION, "max_tokens": 5, "stream": True}
    with client.stream("POST", "/query", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.read().decode())
    *pieces, (name, final) = events
    assert name == "done" and all(n is None for n, _ in pieces)
    done = json.loads(final)
    assert "".join(json.loads(d)["text"] for _, d in pieces) == done["answer"]
    assert done["chunks"] and done["stats"]["n_generated"] == 5
    plain = client.post("/query", json={"question": QUESTION, "max_tokens": 5}).json()
    assert plain["answer"] == done["answer"]


@pytest.mark.parametrize("mode", ["full", "prefix", "reuse", "blend"])
def test_query_modes(client, mode):
    r = client.post(
        "/query", json={"question": QUESTION, "mode": mode, "max_tokens": 2, "recompute_ratio": 0.5}
    )
    assert r.status_code == 200 and r.json()["stats"]["mode"] == mode


CHAT = {"messages": [{"role": "user", "content": QUESTION}]}


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/query", {"question": ""}, "question"),
        ("/query", {"question": "   "}, "question"),
        ("/query", {"question": 5}, "question"),
        ("/query", {"question": "x" * 4001}, "question"),  # the engine's limit, before retrieval
        ("/query", {"question": QUESTION, "top_k": 0}, "top_k"),
        ("/query", {"question": QUESTION, "top_k": 1000}, "top_k"),
        ("/query", {"question": QUESTION, "top_k": True}, "top_k"),  # strict: no bool for an int
        ("/query", {"question": QUESTION, "top_k": "4"}, "top_k"),
        ("/query", {"question": QUESTION, "recompute_ratio": 1.5}, "recompute_ratio"),
        ("/query", {"question": QUESTION, "recompute_ratio": -0.1}, "recompute_ratio"),
        ("/query", {"question": QUESTION, "recompute_ratio": "0.5"}, "recompute_ratio"),
        ("/query", {"question": QUESTION, "mode": "fastest"}, "mode"),
        ("/query", {"question": QUESTION, "max_tokens": 0}, "max_tokens"),
        ("/query", {"question": QUESTION, "max_tokens": 1025}, "max_tokens"),
        ("/query", {"question": QUESTION, "max_tokens": 8.0}, "max_tokens"),
        ("/query", {"question": QUESTION, "temperature": "0"}, "temperature"),
        ("/query", {"question": QUESTION, "stream": "yes"}, "stream"),  # strict: no string for a bool
        ("/query", {"question": QUESTION, "stream": 1}, "stream"),
        ("/query", {"question": QUESTION, "colour": "red"}, "colour"),
        ("/query", {}, "question"),
        ("/search", {"query": "x" * 4001}, "query"),
        ("/search", {"query": QUESTION, "top_k": False}, "top_k"),
        ("/v1/chat/completions", {"messages": []}, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 4001}]}, "question"),
        ("/v1/chat/completions", dict(CHAT, documents=[]), "documents"),  # no answer without context
        ("/v1/chat/completions", dict(CHAT, documents=[""]), "documents.0"),
        ("/v1/chat/completions", dict(CHAT, stream="yes"), "stream"),
        ("/v1/chat/completions", dict(CHAT, top_k=True), "top_k"),
        ("/v1/chat/completions", dict(CHAT, max_tokens=True), "max_tokens"),
        ("/v1/chat/completions", dict(CHAT, seed="7"), "seed"),
        ("/v1/chat/completions", dict(CHAT, n=2), "n"),
        ("/v1/chat/completions", dict(CHAT, recompute_ratio=2), "recompute_ratio"),
        ("/v1/chat/completions", dict(CHAT, mode="fastest"), "mode"),
    ],
)
def test_bad_input_is_422_with_a_clear_message(client, path, body, field):
    r = client.post(path, json=body)
    assert r.status_code == 422
    error = r.json()["error"]
    assert error["param"] == field and field in error["message"]
    assert error["type"] == "invalid_request_error" and error["request_id"] == r.headers["x-request-id"]


@pytest.mark.parametrize(
    ("content", "content_type", "message"),
    [
        (b"{not json", "application/json", "the body is not valid JSON: Expecting property name"),
        (b"", "application/json", "the body must be a JSON object"),
        (b"[1, 2]", "application/json", "the body must be a JSON object"),
        (b'{"question": "hi"}', "text/plain", "content-type application/json"),
    ],
)
@pytest.mark.parametrize("path", ["/query", "/v1/chat/completions"])
def test_a_body_that_is_not_a_json_object_is_422_in_words(client, path, content, content_type, message):
    r = client.post(path, content=content, headers={"content-type": content_type})
    assert r.status_code == 422
    error = r.json()["error"]
    assert message in error["message"] and error["param"] is None


def test_engine_error_is_500_with_request_id(client, tiny_engine, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("simulated kernel failure")

    monkeypatch.setattr(tiny_engine, "prefill", broken)
    for stream in (False, True):
        r = client.post(
            "/query", json={"question": QUESTION, "stream": stream}, headers={"x-request-id": "req-42"}
        )
        assert r.status_code == 500
        assert r.json()["error"] == {
            "message": "internal error; the server log has details under request id req-42",
            "type": "server_error",
            "param": None,
            "request_id": "req-42",
        }
    monkeypatch.undo()
    assert client.post("/query", json={"question": QUESTION, "max_tokens": 1}).status_code == 200


def test_failure_midstream_ends_with_an_error_event(client, tiny_engine, monkeypatch):
    calls = {"n": 0}
    step = tiny_engine._step

    def failing_step(*args):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated decode failure")
        return step(*args)

    monkeypatch.setattr(tiny_engine, "_step", failing_step)
    with client.stream("POST", "/query", json={"question": QUESTION, "stream": True, "max_tokens": 8}) as r:
        events = sse_events(r.read().decode())
    assert r.status_code == 200
    name, data = events[-1]
    assert name == "error" and json.loads(data)["error"]["request_id"] == r.headers["x-request-id"]


def test_search(client):
    r = client.post("/search", json={"query": QUESTION, "top_k": 2})
    assert r.status_code == 200
    chunks = r.json()["chunks"]
    assert len(chunks) == 2 and chunks[0]["score"] >= chunks[1]["score"]


def test_health(client, tiny_engine):
    body = client.get("/health").json()
    assert body == {
        "status": "ok",
        "backend": "engine",
        "model": "llama",
        "fingerprint": tiny_engine.fingerprint,
        "index_documents": 12,
        "index_chunks": 12,
    }


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text format (0 when absent)."""
    want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels else "")
    for line in text.splitlines():
        if not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            if _canonical(key) == want:
                return float(value)
    return 0.0


def _canonical(key: str) -> str:
    if "{" not in key:
        return key
    name, rest = key.split("{", 1)
    pairs = sorted(p for p in rest.rstrip("}").split(",") if p)
    return name + "{" + ",".join(pairs) + "}"


def test_metrics_change_after_requests(client):
    before = client.get("/metrics").text
    client.post("/query", json={"question": QUESTION, "max_tokens": 1, "mode": "reuse"})
    client.post("/query", json={"question": ""})
    after = client.get("/metrics").text
    ok = {"route": "/query", "method": "POST", "status": "200"}
    bad = dict(ok, status="422")
    assert (
        metric(after, "blendrag_http_requests_total", **ok)
        == metric(before, "blendrag_http_requests_total", **ok) + 1
    )
    assert (
        metric(after, "blendrag_http_requests_total", **bad)
        == metric(before, "blendrag_http_requests_total", **bad) + 1
    )
    count = "blendrag_ttft_seconds_count"
    assert metric(after, count, mode="reuse") == metric(before, count, mode="reuse") + 1
    assert metric(after, "blendrag_kv_chunk_lookups_total", result="hit") > metric(
        before, "blendrag_kv_chunk_lookups_total", result="hit"
    )
    assert 0 < metric(after, "blendrag_kv_cache_hit_rate") <= 1
    assert 0 < metric(after, "blendrag_recomputed_token_fraction") < 1
    assert metric(after, "blendrag_kv_store_bytes", tier="all") > 0


def test_openapi_schema_describes_the_routes(client):
    schema = client.get("/openapi.json").json()
    paths = schema["paths"]
    for path in (
        "/query",
        "/search",
        "/v1/chat/completions",
        "/v1/models",
        "/documents",
        "/health",
        "/metrics",
    ):
        assert path in paths
    query = paths["/query"]["post"]
    assert "text/event-stream" in query["responses"]["200"]["content"]
    assert query["responses"]["422"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/ErrorResponse"
    )
    request = schema["components"]["schemas"]["QueryRequest"]
    assert request["additionalProperties"] is False
    assert request["properties"]["top_k"]["minimum"] == 1
    assert paths["/documents"]["post"]["responses"]["202"]


def wait_for_job(client: TestClient, url: str, timeout_s: float = 60) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = client.get(url).json()
        if job["status"] in ("done", "failed"):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job at {url} did not finish")


def test_add_then_delete_documents(tiny_engine, index_dir, tmp_path):
    # An index that starts empty: the server comes up and documents arrive through the API.
    with TestClient(create_app(tiny_engine, tmp_path / "live")) as client:
        assert client.post("/query", json={"question": QUESTION}).status_code == 503
        docs = [
            {"id": "zeppelin", "text": "The Zephyr zeppelin is moored at Quarry Hill.", "metadata": {"k": 1}},
            {"id": "owls", "text": "Barn owls nest in the old mill at Fenwick."},
        ]
        r = client.post("/documents", json={"documents": docs})
        assert r.status_code == 202
        job = r.json()
        assert job["document_ids"] == ["zeppelin", "owls"] and job["status"] in ("queued", "running", "done")
        job = wait_for_job(client, job["status_url"])
        assert job["status"] == "done" and job["queryable"] and job["added_chunks"] == 2
        assert client.get("/health").json()["index_documents"] == 2
        assert all(tiny_engine.chunk_kv.contains(d["text"]) for d in docs)

        hits = client.post("/query", json={"question": "Where is the zeppelin moored?", "top_k": 1}).json()
        assert hits["chunks"][0]["doc_id"] == "zeppelin" and hits["stats"]["cache_hits"] == 1

        r = client.delete("/documents/zeppelin")
        assert r.status_code == 200 and r.json() == {"document_id": "zeppelin", "chunks_deleted": 1}
        assert client.delete("/documents/zeppelin").status_code == 404
        top = client.post("/search", json={"query": "zeppelin", "top_k": 5}).json()["chunks"]
        assert [c["doc_id"] for c in top] == ["owls"]
        assert client.get("/documents/jobs/nope").status_code == 404


@pytest.mark.parametrize(
    "body",
    [
        {"documents": []},
        {"documents": [{"id": "a", "text": ""}]},
        {"documents": [{"text": "no id"}]},
        {"documents": [{"id": "a", "text": "x"}, {"id": "a", "text": "y"}]},
        {"documents": [{"id": "a", "text": "x", "author": "me"}]},
    ],
)
def test_add_documents_validation(client, body):
    assert client.post("/documents", json=body).status_code == 422
