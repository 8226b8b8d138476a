"""Shared fixtures: tiny random-weight checkpoints (fast) and the real embedded model (slow)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import redis
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from blendrag import BlendEngine
from blendrag.loading import default_model_dir
from blendrag.store import MemoryStore

SAMPLE_CORPUS = Path(__file__).resolve().parents[1] / "blendrag" / "samples" / "corpus"
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MUSIQUE = SHARED_DATA / "musique_dev.json"
REDIS_SERVER = shutil.which("redis-server")

# Small enough to run in milliseconds, large enough for GQA and non-trivial attention.
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=4096,
    initializer_range=0.2,
)
TINY_VARIANTS = {
    "llama": dict(model_type="llama"),
    "llama3": dict(
        model_type="llama",
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    "qwen2": dict(model_type="qwen2"),
    "qwen3": dict(model_type="qwen3"),
}


@pytest.fixture(scope="session")
def default_dir() -> Path:
    return default_model_dir()


def make_tiny_checkpoint(root: Path, variant: str, tokenizer_dir: Path) -> Path:
    out = root / variant
    if (out / "config.json").exists():
        return out
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    spec = dict(TINY, **TINY_VARIANTS[variant])
    model_type = spec.pop("model_type")
    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer),
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
        **spec,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # random qkv biases would be zero otherwise; make the bias path matter
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.2)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory, default_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {v: make_tiny_checkpoint(root, v, default_dir) for v in TINY_VARIANTS}


@pytest.fixture(scope="session")
def tiny_engine(tiny_dirs) -> BlendEngine:
    # "prefix" context: exercises the exact-first-chunk path (prefix mode reuses the first chunk).
    # fp32 storage: the blending invariants are exact; what storage formats lose is tested apart.
    return BlendEngine.from_pretrained(
        str(tiny_dirs["llama"]), store=MemoryStore(1 << 30), chunk_context="prefix", kv_format="fp32"
    )


@pytest.fixture(scope="session")
def new_sample_index(tmp_path_factory, tiny_engine):
    """Builds a fresh index of the sample corpus with the tiny engine (one per caller, so a
    module that adds or deletes documents never affects another)."""
    from blendrag.retriever import build_index

    def build(name: str) -> Path:
        path = tmp_path_factory.mktemp(name)
        build_index([SAMPLE_CORPUS], path, tiny_engine)
        return path

    return build


@pytest.fixture(scope="session")
def smol_engine(default_dir) -> BlendEngine:
    return BlendEngine.from_pretrained(None, store=MemoryStore(4 << 30))


@pytest.fixture(scope="session")
def musique() -> list[dict]:
    if not MUSIQUE.exists():
        pytest.skip("../shared/data/musique_dev.json is absent")
    return json.loads(MUSIQUE.read_text())


class RedisServer:
    """A real ``redis-server`` on a free loopback port, in a temp dir, no persistence.

    ``stop`` and ``start`` may be called again (same port): the fault tests take it away mid-run.
    """

    def __init__(self, workdir: Path, *options: str) -> None:
        self.workdir, self.options = workdir, options
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> RedisServer:
        args = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.proc = subprocess.Popen(
            [REDIS_SERVER, *args, *self.options], cwd=self.workdir, stdout=subprocess.DEVNULL
        )
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start on port {self.port}") from None
                time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port)


@pytest.fixture
def redis_server(tmp_path):
    """A fresh redis-server per test (the fault tests stop and restart it)."""
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (Debian: apt-get install redis-server)")
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()
