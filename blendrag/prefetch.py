"""Layer-wise loading of reused KV in the background: while the model computes layer i, a thread
reads layer i+1 of every reused chunk from the store, copies it into the request's buffer and
re-aligns its keys (the loading pipeline of the CacheBlend paper; on CUDA the thread enqueues the
copies on a side stream, ``blendrag.transfer``)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import torch


class LayerPrefetcher:
    """Runs ``load_layer(0)``, ``load_layer(1)``, ... on a daemon thread; ``wait(i)`` returns once
    layer i is loaded, or raises what loading it (or an earlier layer) raised. ``stalled_s`` is
    the time callers spent blocked in ``wait``: the part of the load that compute did not hide."""

    def __init__(self, load_layer: Callable[[int], None], n_layers: int) -> None:
        self._load_layer = load_layer
        self._ready = [threading.Event() for _ in range(n_layers)]
        self._n_loaded = 0
        self._error: BaseException | None = None
        self.stalled_s = 0.0
        # Inference mode is per thread: the loader writes into the caller's inference tensors.
        self._inference = torch.is_inference_mode_enabled()
        threading.Thread(target=self._run, name="blendrag-prefetch", daemon=True).start()

    def _run(self) -> None:
        try:
            with torch.inference_mode(self._inference):
                for i, ready in enumerate(self._ready):
                    self._load_layer(i)
                    self._n_loaded = i + 1
                    ready.set()
        except BaseException as error:  # handed to the request that waits, not lost in this thread
            self._error = error
            for ready in self._ready:
                ready.set()

    def wait(self, layer: int) -> None:
        if not self._ready[layer].is_set():
            start = time.perf_counter()
            self._ready[layer].wait()
            self.stalled_s += time.perf_counter() - start
        if layer >= self._n_loaded:  # not loaded: loading it or an earlier layer failed
            assert self._error is not None
            raise self._error
