"""The one interface every KV store backend implements, and the value it stores."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class ChunkKV:
    """Per-layer KV of one chunk, as computed at precompute time.

    ``k`` holds keys *before* RoPE, so re-alignment to any offset is one exact rotation with
    the same code that rotates fresh keys. Shapes: ``[n_layers, n_kv_heads, n_tokens, head_dim]``.
    """

    k: torch.Tensor
    v: torch.Tensor

    @property
    def n_layers(self) -> int:
        return self.k.shape[0]

    @property
    def n_tokens(self) -> int:
        return self.k.shape[2]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


class KVStore(ABC):
    """Maps a content key (model fingerprint + chunk context + token ids) to a chunk's KV.

    ``get`` never returns a damaged entry: a corrupt or truncated one is reported (logged and
    counted in ``stats["corrupt"]``), dropped, and ``None`` is returned so the caller recomputes.
    """

    def __init__(self) -> None:
        # "unavailable": calls a remote backend could not serve (answered as a miss or skipped).
        self.stats = {"hits": 0, "misses": 0, "corrupt": 0, "puts": 0, "evictions": 0, "unavailable": 0}

    @abstractmethod
    def get(self, key: str) -> ChunkKV | None: ...

    def get_many(self, keys: Sequence[str]) -> list[ChunkKV | None]:
        """``get`` of each key, in order; remote backends override this with one round trip."""
        return [self.get(key) for key in keys]

    @abstractmethod
    def put(self, key: str, kv: ChunkKV) -> None: ...

    @abstractmethod
    def contains(self, key: str) -> bool: ...

    @abstractmethod
    def delete(self, key: str) -> None: ...

    @abstractmethod
    def nbytes(self) -> int:
        """Bytes held by this backend (payload and headers)."""
