"""One tenant's view of a shared store: its keys carry the namespace, so tenants never share KV.

Sharing chunk KV by content across tenants would leak, through time to first token, whether
another tenant has a given text cached; a namespaced view makes every lookup miss another
tenant's entries. The view shares the backend's counters (they describe the backend).
"""

from __future__ import annotations

from collections.abc import Sequence

from blendrag.store.base import ChunkKV, KVStore, LayeredKV


class NamespacedStore(KVStore):
    def __init__(self, inner: KVStore, namespace: str) -> None:
        super().__init__()
        self.inner, self.namespace = inner, namespace
        self.stats = inner.stats

    def _key(self, key: str) -> str:
        return f"{self.namespace}-{key}"

    def get(self, key: str) -> ChunkKV | None:
        return self.inner.get(self._key(key))

    def get_many(self, keys: Sequence[str]) -> list[ChunkKV | None]:
        return self.inner.get_many([self._key(key) for key in keys])

    def get_layered(self, keys: Sequence[str]) -> list[LayeredKV | None]:
        return self.inner.get_layered([self._key(key) for key in keys])

    def put(self, key: str, kv: ChunkKV) -> None:
        self.inner.put(self._key(key), kv)

    def contains(self, key: str) -> bool:
        return self.inner.contains(self._key(key))

    def delete(self, key: str) -> None:
        self.inner.delete(self._key(key))

    def nbytes(self) -> int:
        return self.inner.nbytes()
