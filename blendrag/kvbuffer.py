"""The fused KV of one request: rotated K and V of every layer, indexed by true position."""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import kernels
from .model import ModelArgs
from .prefetch import LayerPrefetcher
from .rope import Rotary, rotate
from .store.base import LayeredKV
from .transfer import HostTransfer, Transfer, transfer_for

# Pinned staging of an asynchronous load: layer i+1 is staged on the host while layer i's copies run.
STAGING_SLOTS = 2


class KVBuffer:
    """``k``/``v`` are ``[n_layers, n_kv_heads, capacity, head_dim]``; slot i holds position i.

    Keeping slot == position means a token's K/V can be overwritten in place by its recomputed
    value, and attention masks are plain comparisons of positions.
    """

    def __init__(
        self, args: ModelArgs, capacity: int, dtype: torch.dtype, device: torch.device | str = "cpu"
    ):
        shape = (args.n_layers, args.n_kv_heads, capacity, args.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0  # positions [0, length) hold valid entries
        self._prefetch: LayerPrefetcher | None = None
        self._transfer: Transfer = HostTransfer()

    def load(self, segments: list[tuple[int, LayeredKV]], rotary: Rotary, background: bool = False) -> None:
        """Copy stored segments in at their start positions and rotate their (un-rotated) keys to
        those positions, with the same arithmetic that rotates fresh keys. In the foreground that
        is one realignment over all layers and segments; with ``background`` a thread loads layer
        by layer (on CUDA through a side stream, ``blendrag.transfer``), and ``wait(layer)``
        (which ``run_layers`` calls) makes compute wait until a layer is in."""
        end = max((start + kv.n_tokens for start, kv in segments), default=0)
        cos, sin = rotary.cos_sin(torch.arange(end, device=self.k.device), self.k.dtype)
        spans = [(start, kv.n_tokens) for start, kv in segments]
        n_layers = self.k.shape[0]
        if background:
            self._transfer = transfer_for(self.k.device, n_layers, (self.k, self.v, cos, sin))
            load_layer = self._layer_loader(segments, spans, cos, sin, self._transfer)
            self._prefetch = LayerPrefetcher(load_layer, n_layers)
            return
        for i in range(n_layers):
            for start, kv in segments:
                k, v = kv.layer(i)
                self.k[i, :, start : start + kv.n_tokens] = k
                self.v[i, :, start : start + kv.n_tokens] = v
        kernels.rope_realign(self.k, spans, cos, sin)

    def _layer_loader(
        self,
        segments: list[tuple[int, LayeredKV]],
        spans: list[tuple[int, int]],
        cos: torch.Tensor,
        sin: torch.Tensor,
        transfer: Transfer,
    ) -> Callable[[int], None]:
        """``load_layer(i)`` for the prefetch thread: copy layer i of every segment in, re-align
        its keys and record it, all enqueued on the transfer's stream. An asynchronous transfer
        reads host memory after the copy is issued, so each source is first staged in pinned
        memory (one that is pinned already is read where it is): a ring of ``STAGING_SLOTS``
        layers, slot i % STAGING_SLOTS reused only once the copies that last read it are done.

        The loader holds the buffer's tensors, not the buffer: the buffer holds the loader (through
        its prefetcher), and a cycle would keep every request's KV alive until Python's garbage
        collector ran."""
        keys, values = self.k, self.v
        ring: list[list[torch.Tensor]] = []
        if transfer.asynchronous:
            _, n_kv_heads, _, head_dim = self.k.shape
            shapes = [(2, n_kv_heads, kv.n_tokens, head_dim) for _, kv in segments]
            ring = [[transfer.pinned(s, self.k.dtype) for s in shapes] for _ in range(STAGING_SLOTS)]

        def stage(source: torch.Tensor, staging: torch.Tensor) -> torch.Tensor:
            return source if source.is_pinned() else staging.copy_(source)

        def load_layer(i: int) -> None:
            if ring and i >= len(ring):
                transfer.sync(i - len(ring))  # the copies that read this slot are done
            with transfer.stream():
                for j, (start, kv) in enumerate(segments):
                    k, v = kv.layer(i)
                    if ring:
                        slot = ring[i % len(ring)][j]
                        k, v = stage(k, slot[0]), stage(v, slot[1])
                    keys[i, :, start : start + kv.n_tokens].copy_(k, non_blocking=True)
                    values[i, :, start : start + kv.n_tokens].copy_(v, non_blocking=True)
                kernels.rope_realign(keys[i : i + 1], spans, cos, sin)
                transfer.record(i)

        return load_layer

    def wait(self, layer: int) -> None:
        """Make compute wait for ``layer`` of a background ``load`` (no-op otherwise): the host
        blocks until the loader thread has issued the layer, then (CUDA) the compute stream is
        ordered after the layer's copies."""
        if self._prefetch is not None:
            self._prefetch.wait(layer)
            self._transfer.wait(layer)

    @property
    def load_stall_s(self) -> float:
        """Time the layer loop's host waited for a background ``load`` (0 for a foreground load).
        On CUDA that is the wait for the loader to issue a layer; the compute stream's wait for
        the copies to finish happens on the GPU and is not in it."""
        return self._prefetch.stalled_s if self._prefetch is not None else 0.0

    def write(self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        kernels.kv_scatter(self.k[layer], self.v[layer], positions, k, v)

    def keys(self, layer: int) -> torch.Tensor:
        return self.k[layer, :, : self.length]

    def values(self, layer: int) -> torch.Tensor:
        return self.v[layer, :, : self.length]


class LayerListKV:
    """A ``KVBuffer`` whose layers are separate tensors, for layer loops that autograd
    differentiates (``blendrag.tune``, and the adapter's chunk prefill that it trains through).
    Every layer of one 4-D tensor shares one version counter, so a write at layer i + 1 would
    invalidate what layer i's attention saved for the backward pass; here writes replace a
    layer's tensor instead of changing it in place. Same interface as ``KVBuffer`` for
    ``run_layers``, ``append_tokens`` and the offset correction."""

    def __init__(
        self, args: ModelArgs, capacity: int, dtype: torch.dtype, device: torch.device | str = "cpu"
    ) -> None:
        shape = (args.n_kv_heads, capacity, args.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(args.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(args.n_layers)]
        self.length = 0

    def load(self, segments: list[tuple[int, LayeredKV]], rotary: Rotary) -> None:
        """``KVBuffer.load`` in the foreground, differentiable with respect to the segments."""
        dtype, device = self.k[0].dtype, self.k[0].device
        placed = []  # each segment's positions and rotation tables, the same at every layer
        for start, kv in segments:
            positions = torch.arange(start, start + kv.n_tokens, device=device)
            placed.append((kv, positions, *rotary.cos_sin(positions, dtype)))
        for i in range(len(self.k)):
            for kv, positions, cos, sin in placed:
                k, v = kv.layer(i)
                self.write(i, positions, rotate(k.to(dtype), cos, sin), v.to(dtype))

    def wait(self, layer: int) -> None:
        pass

    def write(self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k[layer] = self.k[layer].index_copy(1, positions, k)
        self.v[layer] = self.v[layer].index_copy(1, positions, v)

    def keys(self, layer: int) -> torch.Tensor:
        return self.k[layer][:, : self.length]

    def values(self, layer: int) -> torch.Tensor:
        return self.v[layer][:, : self.length]
