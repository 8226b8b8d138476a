"""The API behind a real uvicorn server on 127.0.0.1: the ``openai`` client, SSE over HTTP, concurrency."""

from __future__ import annotations

import json
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import uvicorn

from blendrag.api.app import create_app

QUESTIONS = [
    "Who kept the Saint Orvo lighthouse?",
    "What does the Aquaflux 300 manual say about descaling?",
    "When is Marisco lantern night?",
    "Which railway ran through Brackenmoor?",
]


class ServerThread:
    """uvicorn in a daemon thread on a socket bound to a free port (no race for the port)."""

    def __init__(self, app) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            self.thread.join(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


@pytest.fixture(scope="module")
def server(new_sample_index, tiny_engine) -> str:
    index_dir = new_sample_index("server-index")
    with ServerThread(create_app(tiny_engine, index_dir, model_name="tiny-llama")) as running:
        yield running.url


@pytest.fixture()
def oai(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", timeout=60, max_retries=0)


def test_models(oai):
    assert [m.id for m in oai.models.list()] == ["tiny-llama"]


def test_chat_completion(oai):
    out = oai.chat.completions.create(
        model="tiny-llama",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTIONS[0]}],
        max_tokens=6,
    )
    assert out.object == "chat.completion" and out.model == "tiny-llama"
    assert out.choices[0].message.role == "assistant" and out.choices[0].message.content
    assert out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 6 and out.usage.prompt_tokens > 0
    info = out.model_extra["blendrag"]
    assert info["chunks"][0]["doc_id"] == "saint_orvo_lighthouse.md" and info["stats"]["mode"] == "blend"


def test_chat_completion_stream_matches_and_reports_usage(oai):
    request = dict(model="tiny-llama", messages=[{"role": "user", "content": QUESTIONS[1]}], max_tokens=7)
    whole = oai.chat.completions.create(**request).choices[0].message.content
    chunks = list(oai.chat.completions.create(**request, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 7
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_without_usage_has_no_usage_chunk(oai):
    chunks = list(
        oai.chat.completions.create(
            model="tiny-llama",
            messages=[{"role": "user", "content": QUESTIONS[2]}],
            max_tokens=3,
            stream=True,
        )
    )
    assert all(c.choices for c in chunks) and all(c.usage is None for c in chunks)


def test_chat_completion_with_own_documents(oai):
    docs = ["The Zephyr zeppelin is moored at Quarry Hill.", "Barn owls nest in the old mill."]
    out = oai.chat.completions.create(
        model="tiny-llama",
        messages=[{"role": "user", "content": [{"type": "text", "text": "Where is the zeppelin?"}]}],
        max_tokens=3,
        extra_body={"documents": docs, "mode": "full"},
    )
    info = out.model_extra["blendrag"]
    assert [c["text"] for c in info["chunks"]] == docs and info["chunks"][0]["id"] is None
    assert info["stats"]["mode"] == "full" and info["stats"]["retrieval_s"] == 0.0


def test_openai_client_errors(oai):
    with pytest.raises(openai.NotFoundError, match="not served"):
        oai.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.UnprocessableEntityError, match="user message"):
        oai.chat.completions.create(model="tiny-llama", messages=[{"role": "system", "content": "hi"}])
    with pytest.raises(openai.UnprocessableEntityError, match="presence_penalty"):
        oai.chat.completions.create(
            model="tiny-llama", messages=[{"role": "user", "content": "hi"}], presence_penalty=0.5
        )


def test_query_stream_over_http(server):
    body = {"question": QUESTIONS[0], "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{server}/query", json=body, timeout=60) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-2] == "event: done"
    assert json.loads(lines[-1][len("data: ") :])["stats"]["n_generated"] == 4


def test_engine_error_answers_500_not_a_hang(server, tiny_engine, monkeypatch):
    monkeypatch.setattr(tiny_engine, "prefill", lambda *a, **k: 1 / 0)
    r = httpx.post(
        f"{server}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}, timeout=30
    )
    assert r.status_code == 500 and r.json()["error"]["request_id"] == r.headers["x-request-id"]


def test_parallel_requests_match_sequential(server):
    """8 greedy requests at once (both endpoints, streamed and not) give the sequential answers."""
    cases = [(q, mode) for q in QUESTIONS for mode in ("blend", "full")]

    def ask(case: tuple[str, str], stream: bool = False) -> str:
        question, mode = case
        body = {"question": question, "mode": mode, "max_tokens": 8, "top_k": 3}
        if not stream:
            return httpx.post(f"{server}/query", json=body, timeout=120).json()["answer"]
        with httpx.stream("POST", f"{server}/query", json=dict(body, stream=True), timeout=120) as r:
            data = [line for line in r.iter_lines() if line.startswith("data: ")]
        return json.loads(data[-1][len("data: ") :])["answer"]

    sequential = [ask(case) for case in cases]
    with ThreadPoolExecutor(8) as pool:
        parallel = list(pool.map(ask, cases))
        streamed = list(pool.map(lambda case: ask(case, stream=True), cases))
    assert parallel == sequential and streamed == sequential
    assert len(set(sequential)) > 1  # distinct prompts really gave distinct answers
