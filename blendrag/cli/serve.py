"""``blendrag serve``: load the engine, open the index, run the API under uvicorn.

``--backend`` picks who prefills and decodes (``blendrag.api.backend``): blendrag's engine in
this process (the default), or an in-process vLLM running blendrag's KV connector
(``blendrag.api.vllm_backend``).
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

from blendrag.errors import BlendRAGError
from blendrag.extras import missing_extra

from . import common

BACKENDS = ("engine", "vllm")


def register(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser("serve", help="serve the REST and OpenAI-compatible API over an index")
    serve.add_argument("--index-dir", required=True, type=Path, help="index to answer from (may be new)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--model", help="local checkpoint directory (the one the index was built with)")
    serve.add_argument("--kv-store", help=f"KV store spec (default: INDEX_DIR/{common.KV_DIR_NAME})")
    serve.add_argument("--model-name", help="model id in /v1/models (default: checkpoint directory name)")
    serve.add_argument(
        "--api-keys",
        type=Path,
        help="JSON file mapping API keys to namespaces (default: $BLENDRAG_API_KEYS; none: no keys)",
    )
    serve.add_argument(
        "--max-in-flight",
        type=common.positive_int,
        default=None,
        help="answers decoded at once; more requests wait for a slot (default: 16)",
    )
    serve.add_argument(
        "--backend",
        choices=BACKENDS,
        default="engine",
        help="who prefills and decodes: blendrag's engine, or vLLM with blendrag's KV connector "
        "(needs vllm; modes blend and full only; default: engine)",
    )
    serve.add_argument(
        "--vllm-kv-cache-gb",
        type=common.positive_float,
        default=None,
        help="--backend vllm: vLLM's paged KV cache in GiB (default: vLLM's; on its CPU build "
        "$VLLM_CPU_KVCACHE_SPACE, which also overrides this flag)",
    )
    common.add_device_args(serve)
    common.add_kv_args(serve)
    serve.set_defaults(func=run)


def check_backend(args: argparse.Namespace, kv_store: str) -> None:
    """Refuse a backend that cannot start before the model loads (seconds) and vLLM starts (a minute)."""
    if args.backend != "vllm":
        if args.vllm_kv_cache_gb is not None:
            raise BlendRAGError("--vllm-kv-cache-gb applies to --backend vllm only")
        return
    if importlib.util.find_spec("vllm") is None:
        raise BlendRAGError("--backend vllm needs vLLM installed (scripts/setup.sh --vllm)")
    from blendrag.api.vllm_backend import VLLMBackend

    VLLMBackend.check_store(kv_store)


def run(args: argparse.Namespace) -> None:
    from blendrag.api.app import create_app  # first: a missing [server] extra is named here
    from blendrag.api.tenants import load_tenants

    try:
        import uvicorn
    except ImportError as err:
        raise missing_extra("server", "blendrag serve", err) from err

    tenants = load_tenants(args.api_keys)  # a bad key file fails before the model loads
    kv_store = common.index_kv_store(args.index_dir, args.kv_store)
    check_backend(args, kv_store)
    # The engine loads with either backend: it tokenizes prompts, and indexes documents' KV.
    engine = common.load_engine(args, kv_store, args.index_dir, args.model)
    backend = None  # create_app's default: the engine itself
    if args.backend == "vllm":
        from blendrag.api.vllm_backend import VLLMBackend

        backend = VLLMBackend(engine, kv_store, kv_cache_gb=args.vllm_kv_cache_gb)
    limit = {} if args.max_in_flight is None else {"max_in_flight": args.max_in_flight}
    app = create_app(
        engine, args.index_dir, model_name=args.model_name, tenants=tenants, backend=backend, **limit
    )
    # One process, one event loop: the engine must not be loaded once per worker process.
    uvicorn.run(app, host=args.host, port=args.port, workers=1)
