"""The fused KV of one request: rotated K and V of every layer, indexed by true position."""

from __future__ import annotations

import torch

from . import kernels
from .model import ModelArgs
from .rope import Rotary
from .store.base import ChunkKV


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

    def load(self, segments: list[tuple[int, ChunkKV]], rotary: Rotary) -> None:
        """Copy stored segments in at their start positions, then rotate their (un-rotated) keys
        to those positions: one realignment over all layers and segments, with the same
        arithmetic that rotates fresh keys."""
        for start, kv in segments:
            self.k[:, :, start : start + kv.n_tokens] = kv.k
            self.v[:, :, start : start + kv.n_tokens] = kv.v
        end = max((start + kv.n_tokens for start, kv in segments), default=0)
        cos, sin = rotary.cos_sin(torch.arange(end, device=self.k.device), self.k.dtype)
        kernels.rope_realign(self.k, [(start, kv.n_tokens) for start, kv in segments], cos, sin)

    def write(self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        kernels.kv_scatter(self.k[layer], self.v[layer], positions, k, v)

    def keys(self, layer: int) -> torch.Tensor:
        return self.k[layer, :, : self.length]

    def values(self, layer: int) -> torch.Tensor:
        return self.v[layer, :, : self.length]
