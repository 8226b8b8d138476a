"""Where a background load's copies run: the seam between ``KVBuffer``'s loader and CUDA streams.

On CUDA the loader thread enqueues each layer's host-to-device copies and key re-alignment on a
side stream and records an event per layer; the layer loop makes the compute stream wait for that
event rather than blocking the host, so copying layer i+1 overlaps computing layer i (the loading
pipeline of the CacheBlend paper). Such a copy reads its host source after it was issued, so the
source must be pinned and must not change until the copy is done: ``sync`` says when.

On CPU a copy is done when it is issued: the loader copies straight from the store's tensors and
every call here does nothing, so a background load does exactly what the thread did before.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Protocol

import torch


class Transfer(Protocol):
    # Copies may run after they are issued: host sources are staged in ``pinned`` memory and that
    # memory is reused only after ``sync``. The loader stages only when True.
    asynchronous: bool

    def stream(self) -> AbstractContextManager[object]:
        """Where a layer's copies and re-alignment are enqueued (loader thread)."""
        ...

    def record(self, layer: int) -> None:
        """Mark the end of ``layer``'s enqueued work (loader thread)."""
        ...

    def wait(self, layer: int) -> None:
        """Order the caller's compute after ``layer``'s recorded work (request thread)."""
        ...

    def pinned(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Empty host memory that an asynchronous copy may read."""
        ...

    def sync(self, layer: int) -> None:
        """Block the host until ``layer``'s recorded work is done."""
        ...


class HostTransfer:
    """CPU: nothing to stage, order or wait for."""

    asynchronous = False

    def stream(self) -> AbstractContextManager[object]:
        return nullcontext()

    def record(self, layer: int) -> None:
        pass

    def wait(self, layer: int) -> None:
        pass

    def pinned(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype)  # a copy on the host is done when issued

    def sync(self, layer: int) -> None:
        pass


class CudaTransfer:
    """A side stream for the loader's copies and re-alignment, and one event per layer."""

    asynchronous = True

    def __init__(self, device: torch.device, n_layers: int, shared: Sequence[torch.Tensor]) -> None:
        self._stream = torch.cuda.Stream(device)
        # ``shared`` (the request's buffer, the RoPE tables) was made on the compute stream: the
        # side stream starts after that, and since the caching allocator only tracks the stream a
        # tensor was made on, record_stream keeps their memory from being handed out again while
        # side-stream work on it may still run (a request that stops before waiting every layer).
        self._stream.wait_stream(torch.cuda.current_stream(device))
        for tensor in shared:
            tensor.record_stream(self._stream)
        self._events = [torch.cuda.Event() for _ in range(n_layers)]

    def stream(self) -> AbstractContextManager[object]:
        return torch.cuda.stream(self._stream)

    def record(self, layer: int) -> None:
        self._events[layer].record(self._stream)

    def wait(self, layer: int) -> None:
        # A stream dependency, not a host wait: the host goes on enqueueing the layer's compute.
        torch.cuda.current_stream(self._stream.device).wait_event(self._events[layer])

    def pinned(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, pin_memory=True)

    def sync(self, layer: int) -> None:
        self._events[layer].synchronize()


def transfer_for(device: torch.device, n_layers: int, shared: Sequence[torch.Tensor]) -> Transfer:
    """The transfer a background load into a buffer on ``device`` uses."""
    return CudaTransfer(device, n_layers, shared) if device.type == "cuda" else HostTransfer()
