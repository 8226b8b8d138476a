"""What the subcommands share: argument types, the default KV store, and loading the engine."""

from __future__ import annotations

import argparse
import re
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


_BYTES = re.compile(r"(\d+(?:\.\d+)?)([KMGT]?)", re.IGNORECASE)
_BYTE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def byte_size(text: str) -> int:
    """A positive number of bytes, optionally with a binary unit: 500M, 20G, 1.5T."""
    m = _BYTES.fullmatch(text.strip())
    value = int(float(m[1]) * _BYTE_UNITS[m[2].upper()]) if m else 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive size like 500M or 20G, got {text!r}")
    return value


def kv_format_name(text: str) -> str:
    from blendrag.store.formats import get_format  # imports torch: only when the flag is given

    try:
        return get_format(text).tag
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


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


def add_kv_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--kv-format",
        type=kv_format_name,
        help="how chunk KV is stored: fp32, bf16, fp16, int8, fp8, cachegen[-B1.B2.B3] "
        "(default: the index's format, else int8)",
    )
    parser.add_argument(
        "--kv-max-bytes",
        type=byte_size,
        help="bound the disk KV store, e.g. 20G; least recently used entries are evicted "
        "(kept with the store; default: the store's budget, none for a new store)",
    )
    parser.add_argument(
        "--adapter",
        default="auto",
        help="the reuse adapter chunks are precomputed after (the index's must be the same): "
        "auto (default: the bundled adapter for the bundled model, none for other models), "
        "none, bundled, or a file from `blendrag tune`",
    )
    parser.add_argument(
        "--chunk-context",
        choices=["none", "prefix"],
        help="what chunks are precomputed after: none (alone) or prefix (the prompt prefix, one "
        "attention sink; closer to full prefill for a model without an adapter, and no adapter "
        "applies) (default: the index's, else none)",
    )


def index_settings(index_dir: Path | None) -> dict[str, str | None]:
    """The KV format and chunk context an existing index was built with (empty: no index there
    yet; a chunk context of None: built before it was recorded)."""
    if index_dir is None or not (Path(index_dir) / "chunks.sqlite").is_file():
        return {}
    from blendrag.retriever.index_dir import IndexDir

    with IndexDir(index_dir) as index:
        return {"kv_format": index.kv_format, "chunk_context": index.meta.get("chunk_context")}


def load_engine(
    args: argparse.Namespace, kv_store: str | None, index_dir: Path | None = None, model: str | None = None
) -> BlendEngine:
    """The engine of ``model`` (None: the bundled one) over ``kv_store`` (None: memory only) with
    the device, dtype and KV arguments of ``args`` (missing ones: the defaults), in the KV format
    and chunk context of the index at ``index_dir`` when there is one and the flags give none."""
    from blendrag.engine import BlendEngine
    from blendrag.store import open_store
    from blendrag.store.formats import DEFAULT_FORMAT

    built = index_settings(index_dir)
    kv_format = getattr(args, "kv_format", None) or built.get("kv_format") or DEFAULT_FORMAT
    chunk_context = getattr(args, "chunk_context", None) or built.get("chunk_context") or "none"
    store = open_store(kv_store or "memory", disk_max_bytes=getattr(args, "kv_max_bytes", None))
    return BlendEngine.from_pretrained(
        model,
        store=store,
        device=args.device,
        dtype=args.dtype,
        chunk_context=chunk_context,
        kv_format=kv_format,
        adapter=getattr(args, "adapter", "auto"),
    )


def warm_up(engine: BlendEngine) -> float:
    """One tiny full prefill and decode step, so that a process's one-time costs (allocator,
    kernel selection) are not counted in the first answer's TTFT. Full prefill reads and writes
    no stored KV, so the store is untouched. Returns its seconds."""
    import time

    start = time.perf_counter()
    engine.generate(["Warm-up."], "Ready?", mode="full", max_new_tokens=2)
    return time.perf_counter() - start
