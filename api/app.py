"""``create_app``: the FastAPI app over one engine and one live index.

Concurrency: requests are handled on the event loop; every engine and index call runs on the
engine's single ``ComputeWorker`` thread (see ``worker.py``), one job at a time in arrival order.
"""

from __future__ import annotations

from pathlib import Path

from blendrag.retriever import Retriever
from fastapi import FastAPI
from fastapi.responses import Response

from .documents import documents_router
from .errors import RequestContext, install_error_handlers
from .live_index import LiveIndex
from .metrics import Metrics
from .openai_compat import openai_router
from .query import query_router
from .rag import RAGService
from .schemas import Health


def create_app(
    engine, retriever_or_index_dir: Retriever | str | Path, model_name: str | None = None
) -> FastAPI:
    """The app answering from ``engine`` and the index (a ``Retriever`` or its directory, which may
    not exist yet: documents can be added through the API). ``model_name``: the id in
    ``/v1/models`` (default: the checkpoint directory's name)."""
    model_name = model_name or Path(engine.model_path).name
    index = LiveIndex(engine, retriever_or_index_dir)
    metrics = Metrics(engine.store)
    service = RAGService(engine, index, observe=metrics.observe_generation)

    app = FastAPI(
        title="blendrag",
        version="0.1.0",
        description="RAG over precomputed chunk KV caches, blended at query time (CacheBlend).",
    )
    app.add_middleware(RequestContext, metrics=metrics)
    install_error_handlers(app)
    app.include_router(query_router(service))
    app.include_router(openai_router(service, model_name))
    app.include_router(documents_router(service))

    @app.get("/health", response_model=Health, tags=["ops"])
    async def health() -> Health:
        counts = index.counts
        return Health(
            status="ok",
            model=model_name,
            fingerprint=engine.fingerprint,
            index_documents=counts["documents"],
            index_chunks=counts["chunks"],
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

    app.state.service = service
    app.state.metrics = metrics
    return app
