"""A stack of stores, fastest first (e.g. memory over disk), behaving as one store."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import torch

from blendrag.store.base import ChunkKV, KVStore, LayeredKV


class TieredStore(KVStore):
    """Reads fall through the tiers; a hit in a slower tier is copied into every faster one.

    Writes go to all tiers, so the slowest (persistent) tier holds everything and the faster ones
    hold what fits. Per-tier counters stay in each tier's ``stats``; this store counts hits and
    misses of the stack as a whole and mirrors the tiers' total corrupt entries, evictions and
    unavailable calls.
    """

    def __init__(self, tiers: Sequence[KVStore], names: Sequence[str] | None = None) -> None:
        super().__init__()
        if not tiers:
            raise ValueError("TieredStore needs at least one tier")
        names = list(names) if names is not None else [type(t).__name__ for t in tiers]
        if len(names) != len(tiers) or len(set(names)) != len(names):
            raise ValueError(f"need one unique name per tier, got {names}")
        self.tiers = list(tiers)
        self.names = names

    def get(self, key: str) -> ChunkKV | None:
        return self.get_many([key])[0]

    def get_many(self, keys: Sequence[str]) -> list[ChunkKV | None]:
        """Each tier is asked once, for the keys the faster tiers missed (one round trip each)."""

        def promote(key: str, kv: ChunkKV, faster: list[KVStore]) -> ChunkKV:
            for tier in faster:
                tier.put(key, kv)
            return kv

        return self._lookup(keys, lambda tier, todo: tier.get_many(todo), promote)

    def get_layered(self, keys: Sequence[str]) -> list[LayeredKV | None]:
        """As ``get_many``; an entry found in a slower tier is copied into the faster ones once
        all its layers have been read."""

        def promote(key: str, kv: LayeredKV, faster: list[KVStore]) -> LayeredKV:
            return _Promoting(kv, lambda whole: [tier.put(key, whole) for tier in faster]) if faster else kv

        return self._lookup(keys, lambda tier, todo: tier.get_layered(todo), promote)

    def _lookup(self, keys: Sequence[str], fetch: Callable, promote: Callable) -> list:
        """Ask each tier once (``fetch(tier, keys)``) for the keys faster tiers missed."""
        found: dict = {}
        for i, tier in enumerate(self.tiers):
            todo = [key for key in dict.fromkeys(keys) if key not in found]
            if not todo:
                break
            for key, kv in zip(todo, fetch(tier, todo), strict=True):
                if kv is not None:
                    found[key] = promote(key, kv, self.tiers[:i])
        self.stats["hits"] += sum(key in found for key in keys)
        self.stats["misses"] += sum(key not in found for key in keys)
        self._roll_up()
        return [found.get(key) for key in keys]

    def put(self, key: str, kv: ChunkKV) -> None:
        for tier in self.tiers:
            tier.put(key, kv)
        self.stats["puts"] += 1
        self._roll_up()

    def contains(self, key: str) -> bool:
        return any(tier.contains(key) for tier in self.tiers)

    def delete(self, key: str) -> None:
        for tier in self.tiers:
            tier.delete(key)

    def nbytes(self) -> int:
        return sum(tier.nbytes() for tier in self.tiers)

    def tier_bytes(self) -> dict[str, int]:
        """Bytes held by each tier, keyed by tier name (for metrics)."""
        return {name: tier.nbytes() for name, tier in zip(self.names, self.tiers, strict=True)}

    def _roll_up(self) -> None:
        for name in ("corrupt", "evictions", "unavailable"):
            self.stats[name] = sum(tier.stats[name] for tier in self.tiers)


class _Promoting:
    """A layered entry from a slower tier that hands the whole entry to ``on_complete`` (to copy
    it into the faster tiers) once every layer has been read."""

    def __init__(self, inner: LayeredKV, on_complete: Callable[[ChunkKV], object]) -> None:
        self._inner, self._on_complete = inner, on_complete
        self.n_layers, self.n_tokens, self.format = inner.n_layers, inner.n_tokens, inner.format
        self._layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._lock = threading.Lock()

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self._inner.layer(i)
        with self._lock:
            complete = i not in self._layers and len(self._layers) == self.n_layers - 1
            self._layers[i] = (k, v)
        if complete:
            ks, vs = zip(*(self._layers[j] for j in range(self.n_layers)), strict=True)
            self._on_complete(ChunkKV(torch.stack(ks), torch.stack(vs), self.format))
        return k, v
