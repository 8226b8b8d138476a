"""Blocking use of the async ``RAGService``, for callers without an event loop of their own
(LangChain's sync ``invoke`` and ``stream``, in-process).

The service's coroutines run on one event loop in a daemon thread, shared by every blocking
caller in the process, so it works the same whether or not the calling thread runs a loop of
its own (a notebook's does, and ``asyncio.run`` would refuse there).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator, Coroutine, Iterator
from typing import Any, TypeVar

from blendrag.request import Answer, RAGRequest

from .rag import AnswerStream, RAGService

T = TypeVar("T")
_loop: asyncio.AbstractEventLoop | None = None
_loop_lock = threading.Lock()


def _running_loop() -> asyncio.AbstractEventLoop:
    global _loop
    with _loop_lock:
        if _loop is None:
            _loop = asyncio.new_event_loop()
            threading.Thread(target=_loop.run_forever, name="blendrag-blocking", daemon=True).start()
        return _loop


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on the shared loop and wait for its result."""
    return asyncio.run_coroutine_threadsafe(coro, _running_loop()).result()


class BlockingStream:
    """``RAGService.stream`` for blocking callers: iterate for the text pieces (once), then read
    ``answer``. Stopping early frees the answer's state, as a client gone mid-stream does."""

    def __init__(self, service: RAGService, request: RAGRequest) -> None:
        self._stream: AnswerStream = run(service.stream(request))

    @property
    def answer(self) -> Answer | None:
        return self._stream.answer

    def __iter__(self) -> Iterator[str]:
        pieces = self._stream.__aiter__()
        try:
            while (piece := run(_next(pieces))) is not None:
                yield piece
        finally:
            run(pieces.aclose())


async def _next(pieces: AsyncGenerator[str, None]) -> str | None:
    return await anext(pieces, None)


def answer(service: RAGService, request: RAGRequest) -> Answer:
    """``RAGService.answer`` for blocking callers."""
    return run(service.answer(request))
