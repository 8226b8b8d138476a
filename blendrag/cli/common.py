"""What the subcommands share: argument types, the default KV store, and loading the engine."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from blendrag.engine import BlendEngine

# The index directory's own KV store (blendrag.retriever.index_dir.KV_DIR_NAME), named here so
# that building the parser imports no retriever code.
KV_DIR_NAME = "kv"


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def index_kv_store(index_dir: Path, kv_store: str | None) -> str:
    """On disk beside the index by default, so the KV that `index` computed is there for `query`."""
    return kv_store or str(index_dir / KV_DIR_NAME)


DTYPES = ("float32", "bfloat16", "float16")


def add_device_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device", help="where the model computes, e.g. cpu, cuda, cuda:1 (default: cuda if available)"
    )
    parser.add_argument(
        "--dtype", choices=DTYPES, help="model and KV precision (default: bfloat16 on CUDA, float32 on CPU)"
    )


def load_engine(
    model: str | None, kv_store: str | None, device: str | None = None, dtype: str | None = None
) -> BlendEngine:
    """The engine over ``kv_store`` (None: memory only) on ``device`` in ``dtype`` (None: defaults)."""
    from blendrag.engine import BlendEngine

    return BlendEngine.from_pretrained(model, store=kv_store or "memory", device=device, dtype=dtype)


def warm_up(engine: BlendEngine) -> float:
    """One tiny full prefill and decode step, so that a process's one-time costs (allocator,
    kernel selection) are not counted in the first answer's TTFT. Full prefill reads and writes
    no stored KV, so the store is untouched. Returns its seconds."""
    import time

    start = time.perf_counter()
    engine.generate(["Warm-up."], "Ready?", mode="full", max_new_tokens=2)
    return time.perf_counter() - start
