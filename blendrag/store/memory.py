"""In-process LRU of chunk KV, capped in bytes: the fast tier in front of disk."""

from __future__ import annotations

import threading
from collections import OrderedDict

from blendrag.store.base import ChunkKV, KVStore


class MemoryStore(KVStore):
    """Keeps tensors as-is (no encoding); evicts least-recently-used entries to stay under capacity.

    Entries are shared with callers, who must treat returned tensors as read-only. All methods
    take one lock: the API server calls the store from several threads.
    """

    def __init__(self, capacity_bytes: int) -> None:
        super().__init__()
        self.capacity_bytes = capacity_bytes
        self._entries: OrderedDict[str, ChunkKV] = OrderedDict()  # oldest first
        self._used = 0
        self._lock = threading.Lock()

    def get(self, key: str) -> ChunkKV | None:
        with self._lock:
            kv = self._entries.get(key)
            if kv is None:
                self.stats["misses"] += 1
                return None
            self._entries.move_to_end(key)
            self.stats["hits"] += 1
            return kv

    def put(self, key: str, kv: ChunkKV) -> None:
        # An entry that can never fit is skipped rather than flushing the whole cache for it.
        if kv.nbytes > self.capacity_bytes:
            return
        with self._lock:
            self._remove(key)
            while self._used + kv.nbytes > self.capacity_bytes:
                self._remove(next(iter(self._entries)))
                self.stats["evictions"] += 1
            self._entries[key] = kv
            self._used += kv.nbytes
            self.stats["puts"] += 1

    def contains(self, key: str) -> bool:
        with self._lock:
            return key in self._entries

    def delete(self, key: str) -> None:
        with self._lock:
            self._remove(key)

    def nbytes(self) -> int:
        with self._lock:
            return self._used

    def _remove(self, key: str) -> None:
        kv = self._entries.pop(key, None)
        if kv is not None:
            self._used -= kv.nbytes
