"""One request, every front end: the same defaults, the same bad-input errors, and the same length
rule (the question's cap, prompt tokens + max_tokens within the context) refused before any
compute by the CLI, ``/query``, ``/v1/chat/completions``, LangChain (in-process and remote) and
the vLLM backend. On the tiny random-weight model, whose context is 4,096 tokens."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from blendrag import BlendConfig, BlendEngine
from blendrag.api.app import create_app
from blendrag.api.client import ServerError
from blendrag.api.langchain import ChatBlendRAG
from blendrag.api.live_index import LiveIndex
from blendrag.api.openai_compat import ChatCompletionRequest
from blendrag.api.schemas import QueryRequest
from blendrag.api.vllm_backend import VLLMBackend
from blendrag.cli import build_parser, main
from blendrag.request import MAX_QUESTION_CHARS, InvalidRequest, PromptTooLong, RAGRequest
from blendrag.retriever.search import Retriever
from blendrag.store import MemoryStore
from tests.test_api_server import ServerThread

QUESTION = "Where is the zeppelin?"
LONG_QUESTION = "x" * (MAX_QUESTION_CHARS + 1)
DOCS = ["word " * 1330] * 3  # 4,061 prompt tokens with the SmolLM2 tokenizer: 35 left to decode


@pytest.fixture(scope="module")
def index_dir(new_sample_index) -> Path:
    return new_sample_index("request-index")


@pytest.fixture(scope="module")
def client(tiny_engine, index_dir) -> TestClient:
    with TestClient(create_app(tiny_engine, index_dir)) as client:
        yield client


@pytest.fixture(scope="module")
def vllm_client(tiny_engine, index_dir, tmp_path_factory) -> TestClient:
    """A vLLM backend that is never started: what it refuses, it refuses before vLLM."""
    backend = VLLMBackend(tiny_engine, str(tmp_path_factory.mktemp("kv")))
    return TestClient(create_app(tiny_engine, index_dir, backend=backend))


@pytest.fixture(scope="module")
def server(tiny_engine, index_dir) -> str:
    with ServerThread(create_app(tiny_engine, index_dir)) as running:
        yield running.url


@pytest.fixture(scope="module")
def fit(tiny_engine) -> int:
    """The most tokens a request for DOCS may ask for."""
    left = tiny_engine.limits.context_length - len(tiny_engine.build_prompt(DOCS, QUESTION).ids)
    assert 1 <= left <= 64, "DOCS must leave a few tokens of the context (resize them)"
    return left


def _refuse(*args, **kwargs):
    raise AssertionError("computed before the request was refused")


@pytest.fixture
def no_prefill(monkeypatch):
    """Fails the test if any prompt is prefilled."""
    monkeypatch.setattr(BlendEngine, "_run_prefill", _refuse)


@pytest.fixture
def no_compute(monkeypatch, no_prefill):
    """Fails the test if any prompt is prefilled or any question searched for."""
    monkeypatch.setattr(LiveIndex, "search", _refuse)
    monkeypatch.setattr(Retriever, "search", _refuse)


def test_every_front_end_has_the_same_defaults():
    cli = build_parser().parse_args(["query", "q", "--chunks-file", "chunks.json"])
    rest = QueryRequest(question="q").to_request(BlendConfig())
    chat = ChatCompletionRequest(messages=[{"role": "user", "content": "q"}]).to_request(BlendConfig())
    lc = ChatBlendRAG(base_url="http://127.0.0.1:9")
    core = RAGRequest("q")
    stream_default = inspect.signature(BlendEngine.stream).parameters["max_new_tokens"].default
    assert cli.top_k == rest.top_k == chat.top_k == lc.top_k == core.top_k == 4
    max_tokens = (cli.max_new_tokens, rest.sampling.max_new_tokens, chat.sampling.max_new_tokens)
    assert max_tokens == (128, 128, 128) == (lc.max_tokens, core.sampling.max_new_tokens, stream_default)
    assert cli.mode == rest.mode == chat.mode == lc.mode == core.mode == "blend"
    assert cli.ratio is None and rest.blend is chat.blend is core.blend is None  # the engine's config


def test_a_request_naming_a_ratio_keeps_the_engines_other_settings():
    base = BlendConfig(selector="deviation", check_layer=1)
    request = QueryRequest(question="q", recompute_ratio=0.5).to_request(base)
    assert request.blend == BlendConfig(recompute_ratio=0.5, selector="deviation", check_layer=1)


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"question": " "}, "question"),
        ({"question": "q", "mode": "fast"}, "mode"),
        ({"question": "q", "top_k": 0}, "top_k"),
    ],
)
def test_the_core_request_refuses_what_no_front_end_may_run(kwargs, param):
    with pytest.raises(InvalidRequest) as caught:
        RAGRequest(**kwargs)
    assert caught.value.param == param and param in str(caught.value)


def test_the_question_cap_is_the_engines_and_configurable(tiny_dirs):
    engine = BlendEngine.from_pretrained(
        str(tiny_dirs["llama"]), store=MemoryStore(1 << 26), max_question_chars=20
    )
    assert engine.limits.max_question_chars == 20 and engine.limits.context_length == 4096
    engine.generate(["Alpha is a cat."], "q" * 20, max_new_tokens=1)
    with pytest.raises(InvalidRequest, match="21 characters, over the limit of 20"):
        engine.generate(["Alpha is a cat."], "q" * 21, max_new_tokens=1)


def test_the_context_check_counts_the_tokens_asked_for(tiny_engine, fit):
    tiny_engine.build_prompt(DOCS, QUESTION, fit)  # exactly full
    with pytest.raises(
        PromptTooLong, match=r"plus max_tokens \(\d+\) exceeds the model's context length \(4,096"
    ):
        tiny_engine.build_prompt(DOCS, QUESTION, fit + 1)


# ---- CLI ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chunks_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("chunks") / "chunks.json"
    path.write_text(json.dumps(["Alpha is a cat.", "Beta is a dog."]))
    return path


@pytest.fixture(scope="module")
def long_chunks_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("chunks") / "long.json"
    path.write_text(json.dumps(DOCS))
    return path


def cli_error(argv: list[str], capsys) -> str:
    """Runs the CLI, which must exit 2 with its error as the last line of stderr (argparse prints
    a usage line before it; loading the embedder may print a progress bar); returns that line."""
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and "Traceback" not in err
    last = err.splitlines()[-1]
    assert last.startswith(("blendrag: error: ", "blendrag query: error: ")) and err.count(" error: ") == 1
    return last


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["", "--chunks-file", "{chunks}"], "blendrag: error: the question is empty"),
        (["q", "--chunks-file", "{chunks}", "--top-k", "0"], "argument --top-k: must be >= 1, got 0"),
        (
            ["q", "--chunks-file", "{chunks}", "--top-k", "x"],
            "argument --top-k: invalid positive_int value: 'x'",
        ),
        (["q", "--chunks-file", "{chunks}", "--ratio", "1.5"], "recompute_ratio must be in [0, 1], got 1.5"),
        (
            ["q", "--chunks-file", "{chunks}", "--ratio", "much"],
            "argument --ratio: could not convert string to float",
        ),
        (
            ["q", "--chunks-file", "{chunks}", "--mode", "fastest"],
            "argument --mode: invalid choice: 'fastest'",
        ),
        (
            ["q", "--chunks-file", "{chunks}", "--max-new-tokens", "0"],
            "argument --max-new-tokens: must be >= 1",
        ),
        (["q"], "one of the arguments --index-dir --chunks-file is required"),
        (["q", "--chunks-file", "{missing}"], "cannot read chunks file"),
        (["q", "--chunks-file", "{not_a_list}"], "expected a JSON list of non-empty strings"),
        (["q", "--index-dir", "{missing}"], "no index here"),
        (["q", "--chunks-file", "{chunks}", "--index-dir", "x"], "not allowed with argument"),
        (
            [LONG_QUESTION, "--chunks-file", "{chunks}"],
            "the question is 4,001 characters, over the limit of 4,000",
        ),
        (
            [QUESTION, "--chunks-file", "{long}", "--max-new-tokens", "{over}"],
            "exceeds the model's context length",
        ),
        (["q", "--index-dir", "{index}", "--top-k", "12"], "exceeds the model's context length"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(
    args, message, chunks_file, long_chunks_file, index_dir, fit, tiny_dirs, tmp_path, capsys, no_prefill
):
    not_a_list = tmp_path / "dict.json"
    not_a_list.write_text('{"not": "a list"}')
    paths = {
        "chunks": chunks_file,
        "long": long_chunks_file,
        "missing": tmp_path / "missing",
        "not_a_list": not_a_list,
        "index": index_dir,
        "over": fit + 1,
    }
    argv = ["query", *(a.format(**paths) for a in args), "--model", str(tiny_dirs["llama"])]
    assert message in cli_error(argv, capsys)


def test_cli_refuses_a_long_question_before_retrieval(index_dir, tiny_dirs, capsys, no_compute):
    argv = ["query", LONG_QUESTION, "--index-dir", str(index_dir), "--model", str(tiny_dirs["llama"])]
    assert "the question is 4,001 characters, over the limit of 4,000" in cli_error(argv, capsys)


# ---- the API ----------------------------------------------------------------------------------


def chat(documents: list[str] | None = None, question: str = QUESTION, **body) -> dict:
    return {"messages": [{"role": "user", "content": question}], "documents": documents, **body}


def test_rest_and_openai_refuse_a_long_question_before_retrieval(client, no_compute):
    for path, body in (
        ("/query", {"question": LONG_QUESTION}),
        ("/v1/chat/completions", chat(question=LONG_QUESTION)),
    ):
        r = client.post(path, json={k: v for k, v in body.items() if v is not None})
        assert r.status_code == 422, r.text
        assert r.json()["error"]["message"] == "the question is 4,001 characters, over the limit of 4,000"


def test_rest_refuses_a_prompt_over_the_context_before_prefill(client, monkeypatch):
    monkeypatch.setattr(BlendEngine, "_run_prefill", lambda *a, **k: 1 / 0)  # a 500 if it ran
    r = client.post("/query", json={"question": QUESTION, "top_k": 12, "max_tokens": 1})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert "exceeds the model's context length (4,096 tokens)" in error["message"]
    assert error["type"] == "invalid_request_error" and error["param"] is None


def test_openai_refuses_one_token_over_the_context_and_answers_at_it(client, fit):
    r = client.post("/v1/chat/completions", json=chat(DOCS, max_tokens=fit + 1, mode="full"))
    assert r.status_code == 400 and "context length" in r.json()["error"]["message"]
    r = client.post("/v1/chat/completions", json=chat(DOCS, max_tokens=fit, mode="full"))
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert usage["prompt_tokens"] + fit == 4096 and usage["completion_tokens"] <= fit


def test_vllm_backend_refuses_before_vllm(vllm_client, fit):
    r = vllm_client.post("/v1/chat/completions", json=chat(DOCS, max_tokens=fit + 1))
    assert r.status_code == 400 and "exceeds the model's context length" in r.json()["error"]["message"]
    r = vllm_client.post("/query", json={"question": LONG_QUESTION})
    assert r.status_code == 422 and r.json()["error"]["param"] == "question"


# ---- LangChain --------------------------------------------------------------------------------


def test_langchain_in_process_refuses_with_the_cores_errors(tiny_engine, fit, no_compute):
    with pytest.raises(InvalidRequest, match="over the limit of 4,000"):
        ChatBlendRAG(engine=tiny_engine).invoke(LONG_QUESTION, documents=["Alpha is a cat."])
    with pytest.raises(PromptTooLong, match="context length"):
        ChatBlendRAG(engine=tiny_engine, max_tokens=fit + 1).invoke(QUESTION, documents=DOCS)
    assert issubclass(InvalidRequest, ValueError)  # what LangChain callers catch


def test_langchain_remote_gets_the_servers_refusal(server, fit):
    with pytest.raises(ServerError, match="HTTP 422: the question is 4,001 characters"):
        ChatBlendRAG(base_url=server).invoke(LONG_QUESTION)
    with pytest.raises(ServerError, match="HTTP 400: the prompt .* exceeds the model's context length"):
        ChatBlendRAG(base_url=server, max_tokens=fit + 1).invoke(QUESTION, documents=DOCS)
