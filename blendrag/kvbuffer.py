"""The fused KV of one request: rotated K and V of every layer, indexed by true position."""

from __future__ import annotations

import torch

from .model import ModelArgs
from .rope import Rotary, rotate
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

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def place(self, start: int, kv: ChunkKV, rotary: Rotary) -> None:
        """Copy a stored segment in at ``start``, rotating its (un-rotated) keys to their new
        positions: one rotation for all layers, with the same code that rotates fresh keys."""
        end = start + kv.n_tokens
        cos, sin = rotary.cos_sin(torch.arange(start, end, device=self.k.device), self.k.dtype)
        self.k[:, :, start:end] = rotate(kv.k.to(self.k), cos, sin)
        self.v[:, :, start:end] = kv.v.to(self.v)

    def write(self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k[layer].index_copy_(1, positions, k)
        self.v[layer].index_copy_(1, positions, v)

    def read(self, layer: int, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies (not views) of the entries at ``positions``."""
        return self.k[layer].index_select(1, positions), self.v[layer].index_select(1, positions)

    def keys(self, layer: int) -> torch.Tensor:
        return self.k[layer, :, : self.length]

    def values(self, layer: int) -> torch.Tensor:
        return self.v[layer, :, : self.length]
