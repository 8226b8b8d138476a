"""The ``blendrag serve`` subcommand: load the engine, open the index, run uvicorn."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser("serve", help="serve the REST and OpenAI-compatible API over an index")
    serve.add_argument("--index-dir", required=True, type=Path, help="index to answer from (may be new)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--model", help="local checkpoint directory (the one the index was built with)")
    serve.add_argument("--kv-store", help="KV store spec (default: INDEX_DIR/kv)")
    serve.add_argument("--model-name", help="model id in /v1/models (default: checkpoint directory name)")
    serve.add_argument(
        "--api-keys",
        type=Path,
        help="JSON file mapping API keys to namespaces (default: $BLENDRAG_API_KEYS; none: no keys)",
    )
    serve.add_argument(
        "--max-in-flight",
        type=_positive_int,
        default=None,
        help="answers decoded at once; more requests wait for a slot (default: 16)",
    )
    serve.set_defaults(func=run_serve)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def run_serve(args: argparse.Namespace) -> None:
    import uvicorn
    from blendrag.retriever.commands import load_engine
    from blendrag.retriever.index_dir import KV_DIR_NAME

    from .app import create_app
    from .tenants import load_tenants

    tenants = load_tenants(args.api_keys)  # a bad key file fails before the model loads
    engine = load_engine(args.model, args.kv_store or str(args.index_dir / KV_DIR_NAME))
    limit = {} if args.max_in_flight is None else {"max_in_flight": args.max_in_flight}
    app = create_app(engine, args.index_dir, model_name=args.model_name, tenants=tenants, **limit)
    # One process, one event loop: the engine must not be loaded once per worker process.
    uvicorn.run(app, host=args.host, port=args.port, workers=1)
