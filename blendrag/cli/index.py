"""``blendrag index``: chunk, embed and precompute the KV of documents; show or edit an index."""

from __future__ import annotations

import argparse
from pathlib import Path

from blendrag.errors import BlendRAGError

from . import common

DEFAULT_CHUNK_TOKENS = 512  # blendrag.retriever.chunker's default


def register(subparsers: argparse._SubParsersAction) -> None:
    index = subparsers.add_parser("index", help="index documents (chunk, embed, precompute KV)")
    index.add_argument("paths", nargs="*", metavar="PATH", help=".txt, .md or .jsonl files or folders")
    index.add_argument("--index-dir", required=True, type=Path)
    index.add_argument("--model", help="local checkpoint directory (default: the bundled model)")
    index.add_argument("--chunk-tokens", type=common.positive_int, default=DEFAULT_CHUNK_TOKENS)
    index.add_argument("--overlap", type=int, default=0, help="tokens shared by consecutive chunks")
    index.add_argument("--kv-store", help=f"KV store spec (default: INDEX_DIR/{common.KV_DIR_NAME})")
    action = index.add_mutually_exclusive_group()
    action.add_argument("--stats", action="store_true", help="print what the index holds")
    action.add_argument("--delete", metavar="DOC_ID", help="remove a document, its vectors and its KV")
    common.add_device_args(index)
    common.add_kv_args(index)
    index.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from blendrag.retriever.indexer import build_index, delete_document, index_stats

    kv_store = common.index_kv_store(args.index_dir, args.kv_store)
    if args.stats or args.delete is not None:
        if args.paths:
            raise BlendRAGError("index: give PATHs or --stats or --delete, not both")
        if args.stats:
            for key, value in index_stats(args.index_dir).items():
                print(f"{key}: {value}")
            return
        engine = common.load_engine(args, kv_store, args.index_dir, args.model)
        n = delete_document(args.index_dir, args.delete, engine)
        print(f"deleted {args.delete!r}: {n} chunks")
        return
    if not args.paths:
        raise BlendRAGError("index: give at least one PATH (or --stats, or --delete DOC_ID)")
    if not 0 <= args.overlap < args.chunk_tokens:
        raise BlendRAGError(f"index: --overlap must be in [0, --chunk-tokens), got {args.overlap}")
    missing = [p for p in args.paths if not Path(p).exists()]
    if missing:  # checked before the model loads (seconds) and before anything is written
        raise BlendRAGError(f"index: no such file or folder: {', '.join(missing)}")
    engine = common.load_engine(args, kv_store, args.index_dir, args.model)
    counts = build_index(
        args.paths, args.index_dir, engine, chunk_tokens=args.chunk_tokens, overlap=args.overlap
    )
    print(", ".join(f"{key}: {value}" for key, value in counts.items()))
