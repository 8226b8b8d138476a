"""The one interface every KV store backend implements, and the value it stores."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch


class LayeredKV(Protocol):
    """A chunk's KV that can be read one layer at a time (``k``, ``v``: ``[n_kv_heads, n_tokens,
    head_dim]``), so that computing layer i can start before later layers are read."""

    @property
    def n_layers(self) -> int: ...

    @property
    def n_tokens(self) -> int: ...

    @property
    def format(self) -> str | None: ...

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass
class ChunkKV:
    """Per-layer KV of one chunk, as computed at precompute time.

    ``k`` holds keys *before* RoPE, so re-alignment to any offset is one exact rotation with
    the same code that rotates fresh keys. Shapes: ``[n_layers, n_kv_heads, n_tokens, head_dim]``.
    ``format`` names the ``blendrag.store.formats`` format the values were quantized to and that
    stores write them in (None: raw, in the tensors' own dtype).
    """

    k: torch.Tensor
    v: torch.Tensor
    format: str | None = None

    @property
    def n_layers(self) -> int:
        return self.k.shape[0]

    @property
    def n_tokens(self) -> int:
        return self.k.shape[2]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[i], self.v[i]


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

    def get_layered(self, keys: Sequence[str]) -> list[LayeredKV | None]:
        """Like ``get_many``, but a backend that can read a single layer (disk) returns entries
        that read each layer only when asked for it; a damaged layer then raises
        ``CorruptEntry`` at that read (the entry is dropped and counted first)."""
        return list(self.get_many(keys))

    @abstractmethod
    def put(self, key: str, kv: ChunkKV) -> None: ...

    @abstractmethod
    def contains(self, key: str) -> bool: ...

    @abstractmethod
    def delete(self, key: str) -> None: ...

    @abstractmethod
    def nbytes(self) -> int:
        """Bytes held by this backend (payload and headers)."""
