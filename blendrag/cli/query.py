"""``blendrag query``: answer a question from an index, or from chunks given in a file."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

from blendrag.config import MODES, BlendConfig
from blendrag.errors import BlendRAGError
from blendrag.request import DEFAULT_MAX_NEW_TOKENS, DEFAULT_TOP_K, RAGRequest, SamplingParams, blend_override

from . import common

if TYPE_CHECKING:
    from blendrag.engine import BlendEngine, Generation
    from blendrag.retriever.search import Retriever


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
    query.add_argument(
        "--top-k",
        type=common.positive_int,
        default=DEFAULT_TOP_K,
        help=f"chunks to retrieve (default {DEFAULT_TOP_K})",
    )
    query.add_argument("--mode", choices=MODES, default="blend")
    query.add_argument(
        "--ratio",
        type=_ratio,
        default=None,
        help="share of chunk tokens blend recomputes, 0 to 1 (default 0.15)",
    )
    query.add_argument(
        "--max-new-tokens",
        type=common.positive_int,
        default=DEFAULT_MAX_NEW_TOKENS,
        help=f"answer tokens at most (default {DEFAULT_MAX_NEW_TOKENS})",
    )
    query.add_argument("--json", action="store_true", help="print one JSON object instead of the answer")
    common.add_device_args(query)
    common.add_kv_args(query)
    query.set_defaults(func=run)


def _ratio(text: str) -> float:
    """--ratio: a number that BlendConfig takes as its recompute_ratio."""
    try:
        return BlendConfig(recompute_ratio=float(text)).recompute_ratio
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def run(args: argparse.Namespace) -> None:
    # Every check that needs no model comes first: the request, the chunks file, the index.
    texts = None if args.chunks_file is None else _read_chunks_file(args.chunks_file)
    request = RAGRequest(
        args.question,
        chunks=texts,
        top_k=args.top_k,
        mode=args.mode,
        blend=blend_override(BlendConfig(), args.ratio),  # load_engine's engine has the default config
        sampling=SamplingParams(max_new_tokens=args.max_new_tokens),
    )
    retriever = None if texts is not None else _open_index(args.index_dir)
    kv_store = args.kv_store if retriever is None else common.index_kv_store(args.index_dir, args.kv_store)
    engine = common.load_engine(args, kv_store, args.index_dir if retriever else None, args.model)
    engine.limits.check_question(request.question)  # before retrieval
    retrieved, retrieval_s = ([], 0.0) if retriever is None else _retrieve(retriever, engine, request)
    chunks = list(texts) if texts is not None else [c.text for c in retrieved]
    # The prompt's length is refused here, before anything is computed.
    engine.build_prompt(chunks, request.question, request.sampling.max_new_tokens)
    warmup_s = common.warm_up(engine)  # reported apart: one-time costs are not the answer's TTFT
    generation = _answer(engine, chunks, request, echo=not args.json)
    if args.json:
        result = {
            "answer": generation.text,
            "chunks": [{"id": c.id, "doc_id": c.doc_id, "score": c.score} for c in retrieved],
            "stats": generation.stats.to_dict(),
            "retrieval_s": retrieval_s,
            "warmup_s": warmup_s,
        }
        print(json.dumps(result))


def _open_index(index_dir: Path) -> Retriever:
    from blendrag.retriever.search import Retriever

    return Retriever(index_dir)  # a missing or empty index is reported before the model loads


def _retrieve(retriever: Retriever, engine: BlendEngine, request: RAGRequest) -> tuple[list, float]:
    retriever.index.check_fingerprint(engine)
    start = time.perf_counter()
    retrieved = retriever.search(request.question, request.top_k)
    return retrieved, time.perf_counter() - start


def _answer(engine: BlendEngine, chunks: list[str], request: RAGRequest, echo: bool) -> Generation:
    """Decode the answer; ``echo``: print its pieces as they come."""
    stream = engine.decode(chunks, request.question, request.mode, request.blend, request.sampling)
    for piece in stream:
        if echo:
            print(piece, end="", flush=True)
    if echo:
        print()
    return stream.result


def _read_chunks_file(path: Path) -> tuple[str, ...]:
    try:
        texts = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BlendRAGError(f"{path}: cannot read chunks file: {err}") from None
    if not isinstance(texts, list) or not all(isinstance(t, str) and t.strip() for t in texts):
        raise BlendRAGError(f"{path}: expected a JSON list of non-empty strings")
    return tuple(texts)
