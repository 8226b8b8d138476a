"""``blendrag query``: answer a question from an index, or from chunks given in a file."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from blendrag.config import MODES
from blendrag.errors import BlendRAGError

from . import common


def register(subparsers: argparse._SubParsersAction) -> None:
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
    query.add_argument("--kv-store", help=f"KV store spec (default: INDEX_DIR/{common.KV_DIR_NAME})")
    query.add_argument("--top-k", type=common.positive_int, default=6)
    query.add_argument("--mode", choices=MODES, default="blend")
    query.add_argument(
        "--ratio", type=common.ratio, default=None, help="share of tokens recomputed, 0 to 1 (default 0.15)"
    )
    query.add_argument("--max-new-tokens", type=common.positive_int, default=64)
    query.add_argument("--json", action="store_true", help="print one JSON object instead of the answer")
    query.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    if args.chunks_file is not None:
        retrieved, retrieval_s = None, 0.0
        texts = _read_chunks_file(args.chunks_file)
        engine = common.load_engine(args.model, args.kv_store)
    else:
        from blendrag.retriever.search import Retriever

        # Retrieval first: a missing or empty index is reported before the model is loaded.
        retriever = Retriever(args.index_dir)
        start = time.perf_counter()
        retrieved = retriever.search(args.question, args.top_k)
        retrieval_s = time.perf_counter() - start
        texts = [c.text for c in retrieved]
        engine = common.load_engine(args.model, common.index_kv_store(args.index_dir, args.kv_store))
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
