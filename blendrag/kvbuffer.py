"""The fused KV of one request: rotated K and V of every layer, indexed by true position."""

from __future__ import annotations

import torch

from . import kernels
from .model import ModelArgs
from .prefetch import LayerPrefetcher
from .rope import Rotary
from .store.base import LayeredKV


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

    def load(self, segments: list[tuple[int, LayeredKV]], rotary: Rotary, background: bool = False) -> None:
        """Copy stored segments in at their start positions and rotate their (un-rotated) keys to
        those positions, with the same arithmetic that rotates fresh keys. In the foreground that
        is one realignment over all layers and segments; with ``background`` a thread loads layer
        by layer, and ``wait(layer)`` (which ``run_layers`` calls) blocks until a layer is in."""
        end = max((start + kv.n_tokens for start, kv in segments), default=0)
        cos, sin = rotary.cos_sin(torch.arange(end, device=self.k.device), self.k.dtype)
        spans = [(start, kv.n_tokens) for start, kv in segments]

        def copy_layer(i: int) -> None:
            for start, kv in segments:
                k, v = kv.layer(i)
                self.k[i, :, start : start + kv.n_tokens] = k
                self.v[i, :, start : start + kv.n_tokens] = v

        if background:

            def load_layer(i: int) -> None:
                copy_layer(i)
                kernels.rope_realign(self.k[i : i + 1], spans, cos, sin)

            self._prefetch = LayerPrefetcher(load_layer, self.k.shape[0])
            return
        for i in range(self.k.shape[0]):
            copy_layer(i)
        kernels.rope_realign(self.k, spans, cos, sin)

    def wait(self, layer: int) -> None:
        """Block until ``layer`` of a background ``load`` is in the buffer (no-op otherwise)."""
        if self._prefetch is not None:
            self._prefetch.wait(layer)

    @property
    def load_stall_s(self) -> float:
        """Time the layer loop waited for a background ``load`` (0 for a foreground load)."""
        return self._prefetch.stalled_s if self._prefetch is not None else 0.0

    def write(self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        kernels.kv_scatter(self.k[layer], self.v[layer], positions, k, v)

    def keys(self, layer: int) -> torch.Tensor:
        return self.k[layer, :, : self.length]

    def values(self, layer: int) -> torch.Tensor:
        return self.v[layer, :, : self.length]
