"""Wall-clock timing of a benchmark's calls."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def time_ms(
    fn: Callable[[], object], warmup: int, repeats: int, sync: Callable[[], object] = lambda: None
) -> list[float]:
    """Milliseconds of each of ``repeats`` calls of ``fn``, after ``warmup`` discarded ones.
    ``sync`` waits for queued device work (``torch.cuda.synchronize``), so that each timing
    covers its call's work and only its call's."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(1e3 * (time.perf_counter() - start))
    return times


class Timed:
    """Wraps a callable and adds up the wall time spent in it."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn, self.seconds = fn, 0.0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start
