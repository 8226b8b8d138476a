"""``POST /query`` (answer from the index, JSON or server-sent events) and ``POST /search``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from fastapi import APIRouter, Depends, Request

from blendrag.request import Answer, SourceChunk

from .errors import ERROR_RESPONSES, request_id
from .rag import AnswerStream, RAGService
from .schemas import ChunkOut, QueryRequest, QueryResponse, QueryStats, SearchRequest, SearchResponse
from .sse import event, sse_response

STREAM_DOC = """With `"stream": true` the answer comes as server-sent events (`text/event-stream`):
one unnamed event per text piece, `data: {"text": "..."}`, then one `event: done` whose data
is the `QueryResponse` JSON (answer, chunks, stats). A failure after the stream began sends
`event: error` with the error body (including the request id) and closes the stream."""

# In OpenAPI 3.1 the schema of an event-stream describes one event (3.2 adds `itemSchema`).
SSE_EVENT_SCHEMA = {
    "type": "object",
    "description": "One server-sent event; the route description says what its `data` holds",
    "properties": {"event": {"type": "string"}, "data": {"type": "string"}},
    "required": ["data"],
}
STREAM_RESPONSE = {
    200: {
        "description": "The answer (JSON), or server-sent events when `stream` is true",
        "content": {"text/event-stream": {"schema": SSE_EVENT_SCHEMA}},
    }
}


def query_router(resolve: Callable[..., RAGService]) -> APIRouter:
    """``resolve``: the dependency giving each request its namespace's service (see tenants.py)."""
    router = APIRouter(tags=["rag"], responses={**ERROR_RESPONSES, 503: ERROR_RESPONSES[400]})

    @router.post("/query", response_model=QueryResponse, responses=STREAM_RESPONSE, description=STREAM_DOC)
    async def query(body: QueryRequest, request: Request, service: RAGService = Depends(resolve)):
        stream = await service.stream(body.to_request(service.engine.config))
        if body.stream:
            return sse_response(_events(stream), request_id(request), error_event="error")
        async for _ in stream:
            pass
        return query_response(stream.answer)

    @router.post("/search", response_model=SearchResponse)
    async def search(body: SearchRequest, service: RAGService = Depends(resolve)) -> SearchResponse:
        """Retrieval only: the chunks `/query` would put in the prompt, best first."""
        hits = await service.worker.run(service.index.search, body.query, body.top_k)
        return SearchResponse(chunks=[chunk_out(SourceChunk(c.text, c.id, c.doc_id, c.score)) for c in hits])

    return router


async def _events(stream: AnswerStream) -> AsyncIterator[str]:
    async for piece in stream:
        yield event({"text": piece})
    yield event(query_response(stream.answer).model_dump(), "done")


def query_response(answer: Answer) -> QueryResponse:
    stats = QueryStats.model_validate(
        {k: v for k, v in answer.stats_dict().items() if k in QueryStats.model_fields}
    )
    return QueryResponse(
        answer=answer.generation.text,
        finish_reason=answer.generation.finish_reason,
        chunks=[chunk_out(c) for c in answer.chunks],
        stats=stats,
    )


def chunk_out(chunk: SourceChunk) -> ChunkOut:
    return ChunkOut(id=chunk.id, doc_id=chunk.doc_id, score=chunk.score, text=chunk.text)
