"""``blendrag serve --backend``: argument handling, and what the API does with a backend that runs
fewer modes, without starting vLLM (its real server is tested in test_serve_vllm.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from blendrag.api.app import create_app
from blendrag.api.tenants import TenantConfig
from blendrag.api.vllm_backend import VLLMBackend
from blendrag.cli.serve import check_backend, register
from blendrag.errors import BlendRAGError

QUESTION = "Who kept the Saint Orvo lighthouse?"


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    return parser.parse_args(["serve", "--index-dir", "idx", *argv])


def test_backend_defaults_to_the_engine():
    args = parse()
    assert args.backend == "engine" and args.vllm_kv_cache_gb is None
    check_backend(args, "idx/kv")  # nothing to refuse


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--backend", "tgi"], "invalid choice: 'tgi'"),
        (["--backend", "vllm", "--vllm-kv-cache-gb", "0"], "must be > 0"),
    ],
)
def test_bad_backend_arguments_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse(*argv)
    assert message in capsys.readouterr().err


def test_vllm_options_need_the_vllm_backend():
    with pytest.raises(BlendRAGError, match="--backend vllm only"):
        check_backend(parse("--vllm-kv-cache-gb", "1"), "idx/kv")


def test_vllm_backend_refuses_a_memory_store():
    with pytest.raises(BlendRAGError, match="not 'memory'"):
        VLLMBackend.check_store("memory")


@pytest.fixture(scope="module")
def index_dir(new_sample_index) -> Path:
    return new_sample_index("backend-index")


@pytest.fixture(scope="module")
def client(tiny_engine, index_dir, tmp_path_factory) -> TestClient:
    """The app with a vLLM backend that is never started (no lifespan without ``with``): enough
    for everything the API decides before a request reaches vLLM."""
    backend = VLLMBackend(tiny_engine, str(tmp_path_factory.mktemp("kv")))
    return TestClient(create_app(tiny_engine, index_dir, backend=backend))


@pytest.mark.parametrize("mode", ["reuse", "prefix"])
def test_a_mode_the_backend_cannot_run_is_a_400(client, mode):
    r = client.post("/query", json={"question": QUESTION, "mode": mode})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert f"mode {mode!r} is not available with the vllm backend" in error["message"]
    chat = {"messages": [{"role": "user", "content": QUESTION}], "mode": mode}
    r = client.post("/v1/chat/completions", json=chat)
    assert r.status_code == 400 and "blend, full" in r.json()["error"]["message"]


def test_health_names_the_backend(client):
    assert client.get("/health").json()["backend"] == "vllm"


def test_a_backend_cannot_serve_namespaces_with_their_own_kv(tiny_engine, tmp_path):
    backend = VLLMBackend(tiny_engine, str(tmp_path / "kv"))
    tenants = TenantConfig({"key-aaaaaaaa": "acme"})
    with pytest.raises(BlendRAGError, match="shared_kv"):
        create_app(tiny_engine, tmp_path / "index", tenants=tenants, backend=backend)
    shared = TenantConfig({"key-aaaaaaaa": "acme"}, frozenset({"acme"}))
    create_app(tiny_engine, tmp_path / "index", tenants=shared, backend=backend)
