"""``create_app``: the FastAPI app over one engine and one live index.

Concurrency: requests are handled on the event loop; every engine and index call runs on the
engine's single ``ComputeWorker`` thread (see ``worker.py``), one job at a time in arrival order.
With a vLLM backend (``backend.py``), prefill and decoding run in vLLM instead, which batches
concurrent answers itself; retrieval and indexing stay on the worker.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

from blendrag.extras import missing_extra

try:
    from fastapi import FastAPI
    from fastapi.responses import Response
except ImportError as err:
    raise missing_extra("server", "blendrag's API server", err) from err

from blendrag.errors import BlendRAGError
from blendrag.retriever import Retriever

from .backend import Backend
from .documents import documents_router
from .errors import RequestContext, install_error_handlers
from .live_index import LiveIndex
from .metrics import Metrics
from .openai_compat import openai_router
from .query import query_router
from .rag import InFlightLimit, RAGService
from .schemas import Health
from .tenants import DEFAULT_NAMESPACE, TenantConfig, namespace_engine, namespace_index_dir, service_resolver
from .worker import worker_for

# Each answer in flight holds its prompt's KV buffer (about 0.2 GB for a 4K-token SmolLM2 prompt).
DEFAULT_MAX_IN_FLIGHT = 16


def create_app(
    engine,
    retriever_or_index_dir: Retriever | str | Path,
    model_name: str | None = None,
    tenants: TenantConfig | None = None,
    max_in_flight: int | None = DEFAULT_MAX_IN_FLIGHT,
    backend: Backend | None = None,
) -> FastAPI:
    """The app answering from ``engine`` and the index (a ``Retriever`` or its directory, which may
    not exist yet: documents can be added through the API). ``model_name``: the id in
    ``/v1/models`` (default: the checkpoint directory's name). ``tenants``: API keys and their
    namespaces (see ``tenants.py``); each namespace's index lives under the index directory.
    ``max_in_flight``: answers decoded at once, over all namespaces (more wait; None: no cap).
    ``backend``: who prefills and decodes, built over ``engine`` (default: ``engine`` itself); it
    is started by the app's lifespan, so serve the app with one (uvicorn, ``with TestClient``)."""
    model_name = model_name or Path(engine.model_path).name
    metrics = Metrics(engine.store)
    worker = worker_for(engine)
    if tenants is None:
        indexes = {DEFAULT_NAMESPACE: LiveIndex(engine, retriever_or_index_dir)}
    else:
        if isinstance(retriever_or_index_dir, Retriever):
            raise BlendRAGError("with API keys, pass the index directory: each namespace has its own index")
        root = Path(retriever_or_index_dir)
        indexes = {
            ns: LiveIndex(namespace_engine(engine, tenants, ns), namespace_index_dir(root, ns))
            for ns in tenants.namespaces
        }
    if backend is not None and any(index.engine is not engine for index in indexes.values()):
        # A namespace with its own KV is a view of the engine over another store; a backend is
        # bound to the engine (and store) it was built over, and would miss every chunk.
        raise BlendRAGError(
            f"the {backend.name} backend reads one KV store: with API keys, list every namespace in shared_kv"
        )
    limit = InFlightLimit(max_in_flight) if max_in_flight else None
    observe = metrics.observe_generation
    services = {
        ns: RAGService(index.engine, index, observe=observe, worker=worker, limit=limit, backend=backend)
        for ns, index in indexes.items()
    }
    resolve = service_resolver(services, tenants)
    backend_name = next(iter(services.values())).backend.name

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Inside the server's event loop: vLLM's async engine binds to the loop it starts in.
        async with AsyncExitStack() as stack:
            for started in {id(s.backend): s.backend for s in services.values()}.values():
                await stack.enter_async_context(started.running())
            yield

    app = FastAPI(
        title="blendrag",
        version="0.1.0",
        description="RAG over precomputed chunk KV caches, blended at query time (CacheBlend).",
        lifespan=lifespan,
    )
    app.add_middleware(RequestContext, metrics=metrics)
    install_error_handlers(app)
    app.include_router(query_router(resolve))
    app.include_router(openai_router(resolve, model_name))
    app.include_router(documents_router(resolve))

    @app.get("/health", response_model=Health, tags=["ops"])
    async def health() -> Health:
        """Public (no key): index sizes are summed over every namespace."""
        return Health(
            status="ok",
            backend=backend_name,
            model=model_name,
            fingerprint=engine.fingerprint,
            index_documents=sum(index.counts["documents"] for index in indexes.values()),
            index_chunks=sum(index.counts["chunks"] for index in indexes.values()),
        )

    @app.get(
        "/metrics",
        tags=["ops"],
        response_class=Response,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
    )
    async def prometheus() -> Response:
        """Prometheus text format."""
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    app.state.services = services
    app.state.metrics = metrics
    return app
