"""One thread per engine runs all of its model and index work, in arrival order.

Why a single thread rather than a lock around the engine: the machine has few cores and torch
already spreads one forward over all of them, so two forwards at once only fight for the same
cores. A queue of one keeps the event loop free (requests are accepted, validated and answered
from cache while a forward runs), bounds the number of blocked threads to one, and lets streams
interleave token by token: each decode step is its own job, so a long answer does not hold off
the first token of a request that arrives after it. The engine keeps no state between calls
(every request owns its KV buffer), so interleaving steps of different requests is safe.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class ComputeWorker:
    def __init__(self, name: str = "blendrag-compute") -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._thread: threading.Thread | None = None
        self._pool.submit(self._remember_thread).result()

    def _remember_thread(self) -> None:
        self._thread = threading.current_thread()

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn`` on the worker and wait (blocking). Re-entrant: on the worker it runs inline."""
        if threading.current_thread() is self._thread:
            return fn(*args, **kwargs)
        return self._pool.submit(fn, *args, **kwargs).result()

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn`` on the worker without blocking the event loop."""
        return await asyncio.wrap_future(self._pool.submit(fn, *args, **kwargs))

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Queue ``fn`` on the worker and return at once (its result and errors are dropped)."""
        self._pool.submit(fn, *args)


_WORKERS: weakref.WeakKeyDictionary[object, ComputeWorker] = weakref.WeakKeyDictionary()
_WORKERS_LOCK = threading.Lock()


def worker_for(engine: object) -> ComputeWorker:
    """The engine's worker, shared by every server and LangChain object that uses the engine."""
    with _WORKERS_LOCK:
        if engine not in _WORKERS:
            _WORKERS[engine] = ComputeWorker()
        return _WORKERS[engine]
