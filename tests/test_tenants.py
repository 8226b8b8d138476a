"""Tenants: API keys, namespaced indexes, documents and KV (tiny model, in-process client)."""

from __future__ import annotations

import json
import time

import pytest
from fastapi.testclient import TestClient

from blendrag.api.app import create_app
from blendrag.api.tenants import TenantConfig, load_tenants
from blendrag.cli import main
from blendrag.errors import BlendRAGError

KEYS = {"acme-key-0001": "acme", "globex-key-01": "globex", "public-key-01": "public"}
ACME, GLOBEX, PUBLIC = ({"Authorization": f"Bearer {k}"} for k in KEYS)
SECRET = "The Acme vault code is 4417 and the vault sits under the old granary."


def add(client: TestClient, headers: dict, docs: list[dict]) -> dict:
    r = client.post("/documents", json={"documents": docs}, headers=headers)
    assert r.status_code == 202, r.text
    job = r.json()
    for _ in range(600):
        job = client.get(f"/documents/jobs/{job['job_id']}", headers=headers).json()
        if job["status"] in ("done", "failed"):
            break
        time.sleep(0.05)
    assert job["status"] == "done", job
    return job


@pytest.fixture(scope="module")
def client(tiny_engine, tmp_path_factory):
    tenants = TenantConfig(dict(KEYS), shared_kv=frozenset({"public"}))
    root = tmp_path_factory.mktemp("tenants")
    with TestClient(create_app(tiny_engine, root, model_name="tiny", tenants=tenants)) as client:
        client.acme_job = add(client, ACME, [{"id": "vault", "text": SECRET}])
        add(client, GLOBEX, [{"id": "ferry", "text": "Globex ferries leave the harbour at noon daily."}])
        client.root = root
        yield client


@pytest.mark.parametrize(
    "method, path, body",
    [
        ("POST", "/query", {"question": "vault code?"}),
        ("POST", "/search", {"query": "vault code?"}),
        ("POST", "/documents", {"documents": [{"id": "x", "text": "y"}]}),
        ("DELETE", "/documents/vault", None),
        ("GET", "/v1/models", None),
        ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
    ],
)
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-key-123"}, {"Authorization": "k"}])
def test_missing_or_wrong_key_is_401(client, method, path, body, headers):
    r = client.request(method, path, json=body, headers=headers)
    assert r.status_code == 401, r.text
    assert r.json()["error"]["type"] == "authentication_error"
    assert r.headers["www-authenticate"] == "Bearer"


def test_health_and_metrics_need_no_key(client):
    health = client.get("/health").json()
    assert health["index_documents"] == 2  # summed over namespaces
    assert client.get("/metrics").status_code == 200


def test_each_tenant_sees_only_its_documents(client):
    acme = client.post("/search", json={"query": "vault code", "top_k": 5}, headers=ACME).json()
    globex = client.post("/search", json={"query": "vault code", "top_k": 5}, headers=GLOBEX).json()
    assert {c["doc_id"] for c in acme["chunks"]} == {"vault"}
    assert {c["doc_id"] for c in globex["chunks"]} == {"ferry"}
    answer = client.post("/query", json={"question": "vault code?", "max_tokens": 2}, headers=GLOBEX).json()
    assert all("4417" not in c["text"] for c in answer["chunks"])
    empty = client.post("/search", json={"query": "vault"}, headers=PUBLIC)
    assert empty.status_code == 503  # the public namespace has no documents yet


def test_another_tenants_document_or_job_is_404(client):
    r = client.delete("/documents/vault", headers=GLOBEX)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    assert client.get(f"/documents/jobs/{client.acme_job['job_id']}", headers=GLOBEX).status_code == 404
    assert client.get(f"/documents/jobs/{client.acme_job['job_id']}", headers=ACME).status_code == 200


def test_indexes_live_in_namespace_directories(client):
    assert sorted(p.name for p in (client.root / "namespaces").iterdir()) == ["acme", "globex"]


def chat(client, headers, text: str) -> dict:
    body = {"messages": [{"role": "user", "content": "Code?"}], "documents": [text], "max_tokens": 1}
    r = client.post("/v1/chat/completions", json=body, headers=headers)
    assert r.status_code == 200, r.text
    return r.json()["blendrag"]["stats"]


def test_kv_is_not_shared_across_namespaces_unless_marked_shared(client, tiny_engine):
    # acme indexed SECRET, so its KV is stored under acme's namespace: acme hits, globex does not
    # (a hit would tell globex, through TTFT, that someone has this text cached).
    assert chat(client, ACME, SECRET)["cache_hits"] == 1
    assert chat(client, GLOBEX, SECRET)["cache_misses"] == 1
    assert chat(client, GLOBEX, SECRET)["cache_hits"] == 1  # now globex's own copy
    keys = list(tiny_engine.store._entries)
    chunk_key = tiny_engine.chunk_kv.key(SECRET)
    assert f"acme-{chunk_key}" in keys and f"globex-{chunk_key}" in keys
    # "public" is shared: its KV lives under the bare content key, which the engine itself uses.
    shared = "A shared announcement: the library opens at nine."
    assert chat(client, PUBLIC, shared)["cache_misses"] == 1
    assert tiny_engine.store.contains(tiny_engine.chunk_kv.key(shared))


def test_openai_client_style_key_works(client):
    models = client.get("/v1/models", headers=ACME).json()
    assert [m["id"] for m in models["data"]] == ["tiny"]


def test_no_keys_configured_needs_no_key(tiny_engine, new_sample_index):
    with TestClient(create_app(tiny_engine, new_sample_index("open-index"))) as open_client:
        r = open_client.post("/search", json={"query": "lighthouse"})
        assert r.status_code == 200 and r.json()["chunks"]
        assert "securitySchemes" not in open_client.get("/openapi.json").json().get("components", {})


@pytest.mark.parametrize(
    "text, message",
    [
        ("{", "not valid JSON"),
        ('{"keys": {}}', "expected"),
        ('{"keys": {"short": "acme"}}', "8\\+ characters"),
        ('{"keys": {"long-enough-key": "Bad-Name"}}', "namespaces 1-32"),
        ('{"keys": {"long-enough-key": "acme"}, "shared_kv": ["other"]}', "shared_kv must list"),
        ('{"keys": {"long-enough-key": "acme"}, "extra": 1}', "expected"),
    ],
)
def test_bad_key_config_is_a_clear_error(text, message):
    with pytest.raises(BlendRAGError, match=message):
        TenantConfig.parse(text, "keys.json")


def test_keys_from_file_or_environment(tmp_path, monkeypatch):
    config = {"keys": {"long-enough-key": "acme"}, "shared_kv": ["acme"]}
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(config))
    assert load_tenants(path) == TenantConfig({"long-enough-key": "acme"}, frozenset({"acme"}))
    monkeypatch.delenv("BLENDRAG_API_KEYS", raising=False)
    assert load_tenants() is None
    monkeypatch.setenv("BLENDRAG_API_KEYS", json.dumps(config))
    assert load_tenants().namespace_of("long-enough-key") == "acme"
    assert load_tenants().namespace_of("long-enough-kez") is None


def test_serve_with_bad_key_file_is_one_line_exit_2(tmp_path, capsys):
    bad = tmp_path / "keys.json"
    bad.write_text("not json")
    assert main(["serve", "--index-dir", str(tmp_path / "i"), "--api-keys", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not valid JSON" in err
