"""One RAG request end to end: retrieve (or take the request's chunks), then blend and decode.

Shared by the REST routes, the OpenAI-compatible routes and the in-process LangChain classes
(through ``blocking.py``), so every front end validates, serializes compute and reports stats the
same way. Every index call goes through the engine's ``ComputeWorker``; prefill and decoding go
through the service's ``Backend`` (see ``backend.py``: the engine on that same worker by default,
or vLLM).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import weakref
from collections.abc import AsyncGenerator, Callable, Iterator
from contextlib import contextmanager

from blendrag.errors import BlendRAGError
from blendrag.request import Answer, RAGRequest, SourceChunk
from blendrag.stats import GenerationStats

from .backend import Backend, Decoding, EngineBackend, UnsupportedMode
from .live_index import LiveIndex
from .worker import ComputeWorker, worker_for

log = logging.getLogger(__name__)


class EngineFailure(Exception):
    """The engine failed on a valid request (a server fault, not the caller's)."""


class InFlightLimit:
    """At most ``n`` answers in flight (from prefill to their last token) at once.

    Every answer holds its prompt's KV buffer (~46 KB per token with SmolLM2) until it ends, and
    decode steps of different answers interleave, so without a cap memory grows with the number
    of clients. A request over the cap waits for a slot (no error). The slots are a threading
    semaphore, polled, so that waiting blocks no thread and one limit serves services on
    different event loops (the server's, and ``blocking.py``'s).
    """

    def __init__(self, n: int) -> None:
        if n < 1:
            raise ValueError(f"the in-flight limit must be >= 1, got {n}")
        self.n = n
        self._slots = threading.BoundedSemaphore(n)

    async def acquire(self) -> Slot:
        while not self._slots.acquire(blocking=False):
            await asyncio.sleep(0.01)
        return Slot(self._slots)


class Slot:
    """One answer's place under an ``InFlightLimit``; ``release`` may be called any number of times."""

    def __init__(self, slots: threading.BoundedSemaphore) -> None:
        self._slots: threading.BoundedSemaphore | None = slots

    def release(self) -> None:
        slots, self._slots = self._slots, None
        if slots is not None:
            slots.release()


class RAGService:
    def __init__(
        self,
        engine,
        index: LiveIndex | None = None,
        observe: Callable[[GenerationStats], None] | None = None,
        worker: ComputeWorker | None = None,
        limit: InFlightLimit | None = None,
        backend: Backend | None = None,
    ) -> None:
        """``worker``: default the engine's own; tenants' views of one engine share its worker
        (and should share one ``limit``; None: no cap). ``backend``: who prefills and decodes
        (default: ``engine`` itself, on ``worker``); retrieval always runs on ``worker``."""
        self.engine = engine
        self.index = index
        self.worker = worker or worker_for(engine)
        self.observe = observe or (lambda stats: None)
        self.limit = limit
        self.backend: Backend = backend or EngineBackend(engine, self.worker)

    async def answer(self, request: RAGRequest) -> Answer:
        stream = await self.stream(request)
        async for _ in stream:
            pass
        return stream.answer

    async def stream(self, request: RAGRequest) -> AnswerStream:
        """Retrieve and prefill before returning, so their errors come back as an HTTP error."""
        self._check(request)
        with _as_engine_failure():
            chunks, retrieval_s = await self.worker.run(self._retrieve, request)
            decoding = self.backend.open([c.text for c in chunks], request)
        slot = await self.limit.acquire() if self.limit else None
        stream = AnswerStream(self, decoding, chunks, retrieval_s, slot)
        await stream.start()
        return stream

    def _check(self, request: RAGRequest) -> None:
        """Refuse a mode the backend cannot run and a question over the engine's limit, before
        any retrieval or compute (the prompt's length is checked once it is built)."""
        if request.mode not in self.backend.modes:
            raise UnsupportedMode(
                f"mode {request.mode!r} is not available with the {self.backend.name} backend, which "
                f"runs {', '.join(self.backend.modes)}; use one of those, or a server with --backend engine"
            )
        self.engine.limits.check_question(request.question)

    def _retrieve(self, request: RAGRequest) -> tuple[list[SourceChunk], float]:
        if request.chunks is not None:
            return [SourceChunk(text) for text in request.chunks], 0.0
        if self.index is None:
            raise BlendRAGError("no index to retrieve from: pass documents")
        start = time.perf_counter()
        hits = self.index.search(request.question, request.top_k)
        return [SourceChunk(c.text, c.id, c.doc_id, c.score) for c in hits], time.perf_counter() - start


class AnswerStream:
    """Text pieces of one answer (``async for``); ``answer`` once exhausted."""

    def __init__(
        self,
        service: RAGService,
        decoding: Decoding,
        chunks: list[SourceChunk],
        retrieval_s: float,
        slot: Slot | None = None,
    ) -> None:
        self.service, self.chunks, self.retrieval_s = service, chunks, retrieval_s
        self._decoding = decoding
        self._slot = slot
        if slot is not None:  # also freed if the stream is dropped unread (a client gone early)
            weakref.finalize(self, slot.release)
        self._first: list[str] = []
        self.answer: Answer | None = None

    async def _next(self) -> str | None:
        with _as_engine_failure():
            return await self._decoding.next()

    async def start(self) -> None:
        """Run the prefill (the first step); a failure raises here, before any byte is sent."""
        try:
            self._first = [p for p in [await self._next()] if p is not None]
        except BaseException:
            self._release()
            raise
        self._finish_if_done()

    async def __aiter__(self) -> AsyncGenerator[str, None]:
        try:
            for piece in self._first:
                yield piece
            while self.answer is None and (piece := await self._next()) is not None:
                yield piece
            self._finish_if_done()
        finally:  # also when the consumer stops early: a client that disconnected mid-stream
            self.close()

    def close(self) -> None:
        """Free the backend's state for an answer that will not be read to the end (without
        waiting, so it is safe from an event loop being torn down)."""
        if self.answer is None:
            self._decoding.close()
            self._release()

    def _release(self) -> None:
        if self._slot is not None:
            self._slot.release()

    def _finish_if_done(self) -> None:
        result = self._decoding.result
        if result is not None and self.answer is None:
            self.answer = Answer(result, self.chunks, self.retrieval_s)
            self._release()
            self.service.observe(result.stats)


@contextmanager
def _as_engine_failure() -> Iterator[None]:
    """A user error passes through; anything else becomes an ``EngineFailure``."""
    try:
        yield
    except BlendRAGError:
        raise
    except Exception as err:
        log.exception("engine failure")
        raise EngineFailure(str(err)) from err
