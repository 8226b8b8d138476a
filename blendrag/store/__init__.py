"""Where precomputed chunk KV lives: memory, disk, or memory in front of disk."""

from __future__ import annotations

from urllib.parse import unquote, urlparse

from blendrag.errors import BlendRAGError
from blendrag.store.base import ChunkKV, KVStore
from blendrag.store.disk import DiskStore
from blendrag.store.memory import MemoryStore
from blendrag.store.tiered import TieredStore

__all__ = ["ChunkKV", "KVStore", "MemoryStore", "DiskStore", "TieredStore", "open_store"]

DEFAULT_MEMORY_BYTES = 2 << 30


def open_store(spec: str | None, memory_bytes: int = DEFAULT_MEMORY_BYTES) -> KVStore:
    """Open the store named by ``spec``.

    ``None`` or ``"memory"``: an in-process LRU of ``memory_bytes``. A directory path or
    ``file://`` URL: the same LRU in front of a :class:`DiskStore` at that directory.
    """
    if spec is None or spec == "memory":
        return MemoryStore(memory_bytes)
    url = urlparse(spec)
    if url.scheme == "redis":
        raise BlendRAGError(f"store {spec!r}: Redis is not supported yet; use a directory or 'memory'")
    if url.scheme == "file":
        path = unquote(url.path)
    elif "://" in spec:
        raise BlendRAGError(f"store {spec!r}: unknown scheme {url.scheme!r}; use a directory or 'memory'")
    else:
        path = spec
    return TieredStore([MemoryStore(memory_bytes), DiskStore(path)], names=["memory", "disk"])
