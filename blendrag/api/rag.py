"""One RAG request end to end: retrieve (or take the caller's documents), then blend and decode.

Shared by the REST routes, the OpenAI-compatible routes and the in-process LangChain classes, so
every front end validates, serializes compute and reports stats the same way. Every index call
goes through the engine's ``ComputeWorker``; prefill and decoding go through the service's
``Backend`` (see ``backend.py``: the engine on that same worker by default, or vLLM).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from blendrag.config import Mode
from blendrag.errors import BlendRAGError

from .backend import Backend, Decoding, EngineBackend, Finished, UnsupportedMode
from .live_index import LiveIndex
from .worker import ComputeWorker, worker_for

log = logging.getLogger(__name__)


class EngineFailure(Exception):
    """The engine failed on a valid request (a server fault, not the caller's)."""


@dataclass(frozen=True)
class SourceChunk:
    """A chunk placed in the prompt; ``id``, ``doc_id`` and ``score`` only when retrieved."""

    text: str
    id: int | None = None
    doc_id: str | None = None
    score: float | None = None


@dataclass(frozen=True)
class Ask:
    question: str
    documents: list[str] | None = None  # given: blend exactly these, no retrieval
    top_k: int = 4
    mode: Mode = "blend"
    recompute_ratio: float | None = None
    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class Answer:
    generation: Finished
    chunks: list[SourceChunk]
    retrieval_s: float

    @property
    def stats(self) -> dict:
        return dict(self.generation.stats, retrieval_s=self.retrieval_s)


class InFlightLimit:
    """At most ``n`` answers in flight (from prefill to their last token) at once.

    Every answer holds its prompt's KV buffer (~46 KB per token with SmolLM2) until it ends, and
    decode steps of different answers interleave, so without a cap memory grows with the number
    of clients. A request over the cap waits for a slot (no error). Shared by sync and async
    callers: a threading semaphore, polled from the event loop so that waiting blocks no thread.
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

    def acquire_sync(self) -> Slot:
        self._slots.acquire()
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
        observe: Callable[[dict], None] | None = None,
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

    async def answer(self, ask: Ask) -> Answer:
        stream = await self.stream(ask)
        async for _ in stream:
            pass
        return stream.answer

    async def stream(self, ask: Ask) -> AnswerStream:
        """Retrieve and prefill before returning, so their errors come back as an HTTP error."""
        self._check(ask)
        with _as_engine_failure():
            chunks, retrieval_s = await self.worker.run(self._retrieve, ask)
            decoding = self.backend.open([c.text for c in chunks], ask)
        slot = await self.limit.acquire() if self.limit else None
        stream = AnswerStream(self, decoding, chunks, retrieval_s, slot)
        await stream.start()
        return stream

    def answer_sync(self, ask: Ask) -> Answer:
        stream = self.stream_sync(ask)
        for _ in stream:
            pass
        return stream.answer

    def stream_sync(self, ask: Ask) -> AnswerStream:
        self._check(ask)
        with _as_engine_failure():
            chunks, retrieval_s = self.worker.call(self._retrieve, ask)
            decoding = self.backend.open([c.text for c in chunks], ask)
        slot = self.limit.acquire_sync() if self.limit else None
        stream = AnswerStream(self, decoding, chunks, retrieval_s, slot)
        stream.start_sync()
        return stream

    def _check(self, ask: Ask) -> None:
        """Refuse a mode the backend cannot run, before any retrieval or compute."""
        if ask.mode not in self.backend.modes:
            raise UnsupportedMode(
                f"mode {ask.mode!r} is not available with the {self.backend.name} backend, which runs "
                f"{', '.join(self.backend.modes)}; use one of those, or a server with --backend engine"
            )

    def _retrieve(self, ask: Ask) -> tuple[list[SourceChunk], float]:
        if ask.documents is not None:
            return [SourceChunk(text) for text in ask.documents], 0.0
        if self.index is None:
            raise BlendRAGError("no index to retrieve from: pass documents")
        start = time.perf_counter()
        hits = self.index.search(ask.question, ask.top_k)
        return [SourceChunk(c.text, c.id, c.doc_id, c.score) for c in hits], time.perf_counter() - start


class AnswerStream:
    """Text pieces of one answer (iterate sync or async, not both); ``answer`` once exhausted."""

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

    def _next_sync(self) -> str | None:
        with _as_engine_failure():
            return self._decoding.next_sync()

    async def start(self) -> None:
        """Run the prefill (the first step); a failure raises here, before any byte is sent."""
        try:
            self._first = [p for p in [await self._next()] if p is not None]
        except BaseException:
            self._release()
            raise
        self._finish_if_done()

    def start_sync(self) -> None:
        try:
            self._first = [p for p in [self._next_sync()] if p is not None]
        except BaseException:
            self._release()
            raise
        self._finish_if_done()

    async def __aiter__(self) -> AsyncIterator[str]:
        try:
            for piece in self._first:
                yield piece
            while self.answer is None and (piece := await self._next()) is not None:
                yield piece
            self._finish_if_done()
        finally:  # also when the consumer stops early: a client that disconnected mid-stream
            self.close()

    def __iter__(self) -> Iterator[str]:
        try:
            yield from self._first
            while self.answer is None and (piece := self._next_sync()) is not None:
                yield piece
            self._finish_if_done()
        finally:
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
