"""``blendrag serve --backend vllm`` as a real server process, over an index of the sample corpus
built with SmolLM2 by the project's indexer. vLLM takes about a minute to start on CPU: one
server serves the whole module. The engine backend's answers come from the same index in this
process (``create_app`` in a ``TestClient``).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from conftest import SAMPLE_CORPUS
from fastapi.testclient import TestClient

from blendrag import BlendEngine
from blendrag.api.app import create_app
from blendrag.retriever import build_index
from blendrag.retriever.index_dir import KV_DIR_NAME

pytest.importorskip("vllm")

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

QUESTION = "Who kept the Saint Orvo lighthouse?"
MAX_TOKENS = 16
STARTUP_S = 600


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("vllm-serve-index")


@pytest.fixture(scope="module")
def engine(index_dir) -> BlendEngine:
    """SmolLM2 over the index's KV store; builds the index (chunk KV precomputed) as
    ``blendrag index samples/corpus --index-dir INDEX`` does."""
    engine = BlendEngine.from_pretrained(store=str(index_dir / KV_DIR_NAME))
    build_index([SAMPLE_CORPUS], index_dir, engine)
    return engine


@pytest.fixture(scope="module")
def server(engine, index_dir, tmp_path_factory) -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("vllm-serve-log") / "server.log"
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1")
    argv = [sys.executable, "-m", "blendrag.cli", "serve", "--backend", "vllm"]
    argv += ["--index-dir", str(index_dir), "--port", str(port)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_up(url, proc, log)
        yield url
    finally:
        proc.terminate()  # uvicorn's shutdown runs the lifespan's exit: vLLM's engine process ends too
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _wait_until_up(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(1)
    pytest.fail(f"the server did not answer within {STARTUP_S} s:\n{log.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def engine_client(engine, index_dir) -> TestClient:
    with TestClient(create_app(engine, index_dir)) as client:
        yield client


def chat(url_or_client, **body) -> dict:
    body = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": MAX_TOKENS, **body}
    if isinstance(url_or_client, str):
        r = httpx.post(f"{url_or_client}/v1/chat/completions", json=body, timeout=300)
    else:
        r = url_or_client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_query_stream_and_openai_client(server):
    health = httpx.get(f"{server}/health", timeout=10).json()
    assert health["backend"] == "vllm" and health["index_chunks"] > 0
    query = {"question": QUESTION, "top_k": 3, "max_tokens": MAX_TOKENS}
    r = httpx.post(f"{server}/query", json=query, timeout=300)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["answer"] and body["chunks"][0]["doc_id"] == "saint_orvo_lighthouse.md"
    stats = body["stats"]
    # The connector blended the prompt (all 3 chunks stored at index time): vLLM computed one token.
    assert stats["mode"] == "blend" and stats["cache_hits"] == 3 and stats["cache_misses"] == 0
    assert stats["vllm_cached_tokens"] == stats["n_tokens"] - 1
    assert 0 < stats["n_recomputed"] < stats["n_tokens"]  # the connector's count, handed back by vLLM
    assert stats["ttft_s"] > 0 and stats["decode_s"] >= 0 and 0 < stats["n_generated"] <= MAX_TOKENS

    with httpx.stream("POST", f"{server}/query", json=dict(query, stream=True), timeout=300) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-2] == "event: done"
    pieces = [json.loads(line.removeprefix("data: "))["text"] for line in lines[:-2]]
    done = json.loads(lines[-1].removeprefix("data: "))
    assert "".join(pieces) == done["answer"] == body["answer"]  # greedy, same blended prompt

    oai = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", timeout=300, max_retries=0)
    [model] = [m.id for m in oai.models.list()]
    out = oai.chat.completions.create(
        model=model, messages=[{"role": "user", "content": QUESTION}], max_tokens=MAX_TOKENS
    )
    assert out.choices[0].message.content and out.choices[0].finish_reason in ("stop", "length")
    info = out.model_extra["blendrag"]
    assert info["stats"]["cache_hits"] == len(info["chunks"]) == 4  # top_k's default
    assert out.usage.prompt_tokens == info["stats"]["n_tokens"]


def test_ratio_one_answers_as_the_engine_backends_full_prefill(server, engine_client):
    # Chunks from the index, so that their KV is stored and the connector blends.
    r = httpx.post(f"{server}/search", json={"query": QUESTION, "top_k": 2}, timeout=60)
    documents = [c["text"] for c in r.json()["chunks"]]
    reference = chat(engine_client, documents=documents, mode="full")
    blended = chat(server, documents=documents, recompute_ratio=1.0)
    assert blended["blendrag"]["stats"]["cache_hits"] == 2
    assert blended["choices"][0]["message"]["content"] == reference["choices"][0]["message"]["content"]
    # "full" on vLLM: no chunk structure, vLLM prefills the prompt itself.
    full = chat(server, documents=documents, mode="full")
    assert full["blendrag"]["stats"]["cache_hits"] == 0
    assert full["choices"][0]["message"]["content"] == reference["choices"][0]["message"]["content"]


def test_a_mode_vllm_cannot_run_is_a_400(server):
    r = httpx.post(f"{server}/query", json={"question": QUESTION, "mode": "reuse"}, timeout=60)
    assert r.status_code == 400
    assert "mode 'reuse' is not available with the vllm backend" in r.json()["error"]["message"]
