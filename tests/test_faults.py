"""Faults with real parts: Redis stopped and restarted, corrupt blobs in Redis, a full disk while
writing KV, a client that disconnects mid-stream from a real uvicorn server."""

from __future__ import annotations

import os
import re
import sqlite3
import threading
import time

import httpx
import pytest
from conftest import SAMPLE_CORPUS
from fastapi.testclient import TestClient
from test_api_server import QUESTIONS, ServerThread
from test_store import DiskFull

from blendrag import BlendEngine
from blendrag.api.app import create_app
from blendrag.errors import BlendRAGError
from blendrag.retriever import build_index
from blendrag.retriever.docstore import DB_NAME
from blendrag.store import DiskStore, MemoryStore, RedisStore, TieredStore


def redis_engine(tiny_dirs, url: str) -> tuple[BlendEngine, RedisStore]:
    """The tiny model over Redis alone (no memory tier that would hide Redis)."""
    remote = RedisStore(url, timeout_s=0.5, retry_s=0.1)
    store = TieredStore([remote], names=["redis"])
    return BlendEngine.from_pretrained(str(tiny_dirs["llama"]), store=store, chunk_context="prefix"), remote


def metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    match = re.search(rf"^{name}\{{{re.escape(want)}\}} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def test_redis_outage_falls_back_to_compute_then_recovers(redis_server, tiny_dirs, new_sample_index):
    engine, remote = redis_engine(tiny_dirs, redis_server.url)
    client = TestClient(create_app(engine, new_sample_index("outage-index"), model_name="tiny"))
    body = {"question": QUESTIONS[0], "top_k": 3, "max_tokens": 8}

    def ask() -> dict:
        r = client.post("/query", json=body)
        assert r.status_code == 200, r.text
        return r.json()

    first = ask()  # KV computed and written to Redis
    warm = ask()
    assert warm["answer"] == first["answer"] and warm["stats"]["cache_hits"] == 3

    redis_server.stop()
    down = ask()
    assert down["answer"] == first["answer"]
    assert down["stats"]["cache_hits"] == 0 and down["stats"]["cache_misses"] == 3
    assert not remote.available
    metrics = client.get("/metrics").text
    assert metric(metrics, "blendrag_kv_store_events_total", tier="redis", event="unavailable") >= 1

    redis_server.start()  # comes back empty (no persistence)
    time.sleep(0.15)  # past retry_s
    refill = ask()
    again = ask()
    assert refill["answer"] == again["answer"] == first["answer"]
    assert again["stats"]["cache_hits"] == 3 and remote.available
    assert remote.stats["hits"] >= 3


def test_corrupt_blobs_in_redis_are_recomputed_and_counted(redis_server, tiny_dirs):
    engine, remote = redis_engine(tiny_dirs, redis_server.url)
    chunks = ["The lighthouse keeper was Ada Brenn.", "Ferries leave at noon.", "Gulls nest on the pier."]
    reference = engine.generate(chunks, "Who kept the lighthouse?", max_new_tokens=6)
    client = redis_server.client()
    keys = client.keys(f"{remote.prefix}*")
    assert len(keys) == 4  # the prompt prefix and three chunks
    for key in keys:
        blob = bytearray(client.get(key))
        blob[len(blob) // 2] ^= 0xFF
        client.set(key, bytes(blob))
    out = engine.generate(chunks, "Who kept the lighthouse?", max_new_tokens=6)
    assert out.text == reference.text
    assert out.stats.cache_misses == 3 and remote.stats["corrupt"] == 4
    assert engine.generate(chunks, "Who kept the lighthouse?", max_new_tokens=6).stats.cache_hits == 3


def test_disk_full_while_indexing_is_a_clean_error_then_resumes(tmp_path, tiny_dirs, new_sample_index):
    kv_dir, index_dir = tmp_path / "kv", tmp_path / "index"
    disk = DiskStore(kv_dir)
    store = TieredStore([MemoryStore(0), disk], names=["memory", "disk"])  # memory keeps nothing
    engine = BlendEngine.from_pretrained(str(tiny_dirs["llama"]), store=store)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "fdopen", DiskFull)
        with pytest.raises(BlendRAGError, match="could not write KV entry .*No space left on device"):
            build_index([SAMPLE_CORPUS], index_dir, engine)
    assert [p for p in kv_dir.glob("*/*") if p.is_file()] == []  # no partial entry, no temp file
    build_index([SAMPLE_CORPUS], index_dir, engine)  # space is back: the same command resumes
    rows = sqlite3.connect(index_dir / DB_NAME).execute("SELECT hash, kv_key, kv_done FROM chunks").fetchall()
    clean = sqlite3.connect(new_sample_index("clean-index") / DB_NAME).execute("SELECT hash FROM chunks")
    assert sorted(h for h, _, _ in rows) == sorted(h for (h,) in clean)
    assert all(done and disk.contains(key) for _, key, done in rows)


def test_client_disconnect_mid_stream_frees_the_generation(tiny_engine, new_sample_index, monkeypatch):
    closed, produced = threading.Event(), []
    real_decode = tiny_engine._decode

    def tracked(*args, **kwargs):
        try:
            for item in real_decode(*args, **kwargs):
                produced.append(item)
                yield item
        except GeneratorExit:
            closed.set()
            raise

    monkeypatch.setattr(tiny_engine, "_decode", tracked)
    monkeypatch.setattr(tiny_engine, "eos_ids", set())  # never stops early on its own
    app = create_app(tiny_engine, new_sample_index("disconnect-index"), model_name="tiny")
    with ServerThread(app) as server:
        body = {"question": QUESTIONS[1], "max_tokens": 1024, "stream": True}
        with httpx.stream("POST", f"{server.url}/query", json=body, timeout=60) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
        # the connection is closed here, long before 1024 tokens
        assert closed.wait(30), "the engine's generator was not closed after the client left"
        n_at_close = len(produced)
        time.sleep(0.3)
        assert len(produced) == n_at_close < 1024  # nothing decoded after the close
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
