"""The ``blendrag index`` and ``blendrag query`` subcommands (registered by ``blendrag.cli``)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from blendrag.errors import BlendRAGError

from .chunker import DEFAULT_CHUNK_TOKENS
from .index_dir import KV_DIR_NAME
from .indexer import build_index, delete_document, index_stats
from .search import Retriever

MODES = ("blend", "full", "reuse", "prefix")


def register(subparsers: argparse._SubParsersAction) -> None:
    index = subparsers.add_parser("index", help="index documents (chunk, embed, precompute KV)")
    index.add_argument("paths", nargs="*", metavar="PATH", help=".txt, .md or .jsonl files or folders")
    index.add_argument("--index-dir", required=True, type=Path)
    index.add_argument("--model", help="local checkpoint directory (default: the engine's default model)")
    index.add_argument("--chunk-tokens", type=int, default=DEFAULT_CHUNK_TOKENS)
    index.add_argument("--overlap", type=int, default=0, help="tokens shared by consecutive chunks")
    index.add_argument("--kv-store", help=f"KV store spec (default: INDEX_DIR/{KV_DIR_NAME})")
    action = index.add_mutually_exclusive_group()
    action.add_argument("--stats", action="store_true", help="print what the index holds")
    action.add_argument("--delete", metavar="DOC_ID", help="remove a document, its vectors and its KV")
    index.set_defaults(func=run_index)

    query = subparsers.add_parser("query", help="answer a question from the index")
    query.add_argument("question")
    source = query.add_mutually_exclusive_group(required=True)
    source.add_argument("--index-dir", type=Path, help="retrieve the chunks from this index")
    source.add_argument(
        "--chunks-file", type=Path, help="a JSON list of chunk texts: blend these, no retrieval"
    )
    query.add_argument(
        "--model", help="local checkpoint directory (must be the one the index was built with)"
    )
    query.add_argument("--kv-store", help=f"KV store spec (default: INDEX_DIR/{KV_DIR_NAME})")
    query.add_argument("--top-k", type=int, default=6)
    query.add_argument("--mode", choices=MODES, default="blend")
    query.add_argument(
        "--ratio", type=float, default=None, help="share of tokens recomputed (engine default)"
    )
    query.add_argument("--max-new-tokens", type=int, default=64)
    query.add_argument("--json", action="store_true", help="print one JSON object instead of the answer")
    query.set_defaults(func=run_query)


def load_engine(model: str | None, kv_store: str | None):
    """The engine with its KV store; ``kv_store`` None keeps KV in memory only."""
    # Imported here: the engine pulls in the model code, which --stats and bad input never need.
    from blendrag import BlendEngine
    from blendrag.store import open_store

    return BlendEngine.from_pretrained(model, store=open_store(kv_store))


def run_index(args: argparse.Namespace) -> None:
    if args.stats or args.delete is not None:
        if args.paths:
            raise BlendRAGError("index: give PATHs or --stats or --delete, not both")
        if args.stats:
            for key, value in index_stats(args.index_dir).items():
                print(f"{key}: {value}")
            return
        engine = load_engine(args.model, _kv_store(args))
        n = delete_document(args.index_dir, args.delete, engine)
        print(f"deleted {args.delete!r}: {n} chunks")
        return
    if not args.paths:
        raise BlendRAGError("index: give at least one PATH (or --stats, or --delete DOC_ID)")
    engine = load_engine(args.model, _kv_store(args))
    counts = build_index(
        args.paths, args.index_dir, engine, chunk_tokens=args.chunk_tokens, overlap=args.overlap
    )
    print(", ".join(f"{key}: {value}" for key, value in counts.items()))


def run_query(args: argparse.Namespace) -> None:
    if args.chunks_file is not None:
        retrieved, retrieval_s = None, 0.0
        texts = _read_chunks_file(args.chunks_file)
        engine = load_engine(args.model, args.kv_store)
    else:
        # Retrieval first: a missing or empty index is reported before the model is loaded.
        retriever = Retriever(args.index_dir)
        start = time.perf_counter()
        retrieved = retriever.search(args.question, args.top_k)
        retrieval_s = time.perf_counter() - start
        texts = [c.text for c in retrieved]
        engine = load_engine(args.model, _kv_store(args))
        retriever.index.check_fingerprint(engine.fingerprint)
    generation = engine.generate(
        texts, args.question, mode=args.mode, recompute_ratio=args.ratio, max_new_tokens=args.max_new_tokens
    )
    if not args.json:
        print(generation.text)
        return
    chunks = [{"id": c.id, "doc_id": c.doc_id, "score": c.score} for c in retrieved or []]
    result = {
        "answer": generation.text,
        "chunks": chunks,
        "stats": generation.stats,
        "retrieval_s": retrieval_s,
    }
    print(json.dumps(result))


def _read_chunks_file(path: Path) -> list[str]:
    try:
        texts = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BlendRAGError(f"{path}: cannot read chunks file: {err}") from None
    if not isinstance(texts, list) or not all(isinstance(t, str) and t.strip() for t in texts):
        raise BlendRAGError(f"{path}: expected a JSON list of non-empty strings")
    return texts


def _kv_store(args: argparse.Namespace) -> str:
    # On disk beside the index by default, so the KV that `index` computed is there for `query`.
    return args.kv_store or str(args.index_dir / KV_DIR_NAME)
