"""Who prefills and decodes an answer: the small interface ``RAGService`` talks to.

Retrieval, the index and chunk-KV precompute always use blendrag's engine in the server process;
a backend only turns (chunks, question, sampling) into text pieces. Two implement it:
``EngineBackend`` (blendrag's in-process engine, the default) and ``vllm_backend.VLLMBackend``
(an in-process vLLM with ``BlendConnector``). Everything above this interface (``RAGService``,
the routes, metrics) is the same for both.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Protocol

from blendrag.config import MODES, Mode
from blendrag.engine import BlendEngine, Generation, GenerationStream
from blendrag.errors import BlendRAGError
from blendrag.request import RAGRequest

from .worker import ComputeWorker


class UnsupportedMode(BlendRAGError):
    """The request asks for a prefill mode the server's backend cannot run (a 400)."""


class Decoding(Protocol):
    """One answer on its way. The first ``next`` runs the prefill, so its errors reach the caller
    before any byte of the response is sent."""

    @property
    def result(self) -> Generation | None:
        """The answer, once the last piece has been read (``first_logits`` None where the
        backend's model runs elsewhere)."""

    async def next(self) -> str | None:
        """The next non-empty text piece, or None when the answer is complete."""

    def close(self) -> None:
        """Stop early and free the answer's state. Must not block or wait: it is also called
        while an event loop is being torn down."""


class Backend(Protocol):
    name: str  # "engine" | "vllm": reported by /health
    modes: tuple[Mode, ...]  # the prefill modes it can run; RAGService refuses the others

    def open(self, chunks: list[str], request: RAGRequest) -> Decoding:
        """Start nothing yet: the answer is computed as its ``Decoding`` is read."""

    def running(self) -> contextlib.AbstractAsyncContextManager[None]:
        """Held for the server's lifetime (its lifespan), inside the server's event loop."""


class EngineBackend:
    """blendrag's engine in this process. Every prefill and decode step is one job on the
    engine's ``ComputeWorker`` (see ``worker.py``), so concurrent answers interleave step by step."""

    name = "engine"
    modes: tuple[Mode, ...] = MODES

    def __init__(self, engine: BlendEngine, worker: ComputeWorker) -> None:
        self.engine, self.worker = engine, worker

    def open(self, chunks: list[str], request: RAGRequest) -> EngineDecoding:
        stream = self.engine.decode(chunks, request.question, request.mode, request.blend, request.sampling)
        return EngineDecoding(stream, self.worker)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        yield  # the engine is loaded before the server starts and needs no shutdown


class EngineDecoding:
    def __init__(self, stream: GenerationStream, worker: ComputeWorker) -> None:
        self._stream, self._worker = stream, worker
        self._pieces: Iterator[str] = iter(stream)

    @property
    def result(self) -> Generation | None:
        return self._stream.result

    async def next(self) -> str | None:
        return await self._worker.run(next, self._pieces, None)

    def close(self) -> None:
        # Queued, not waited for: a decode step of this answer may be running on the worker.
        self._worker.submit(self._stream.close)
