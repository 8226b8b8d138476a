"""Where precomputed chunk KV lives: memory, disk, Redis, or a stack of them (fastest first)."""

from __future__ import annotations

from urllib.parse import parse_qs, unquote, urlparse, urlunparse

from blendrag.errors import BlendRAGError
from blendrag.store.base import ChunkKV, KVStore
from blendrag.store.disk import DiskStore
from blendrag.store.memory import MemoryStore
from blendrag.store.namespaced import NamespacedStore
from blendrag.store.tiered import TieredStore

__all__ = [
    "ChunkKV",
    "KVStore",
    "MemoryStore",
    "DiskStore",
    "RedisStore",
    "TieredStore",
    "NamespacedStore",
    "open_store",
]

DEFAULT_MEMORY_BYTES = 2 << 30


def __getattr__(name: str) -> object:
    # RedisStore is imported on first use: it needs the redis extra, the other stores do not.
    if name == "RedisStore":
        from blendrag.store.redis import RedisStore

        return RedisStore
    raise AttributeError(f"module 'blendrag.store' has no attribute {name!r}")


def open_store(
    spec: str | None, memory_bytes: int = DEFAULT_MEMORY_BYTES, disk_max_bytes: int | None = None
) -> KVStore:
    """Open the store named by ``spec``.

    ``None`` or ``"memory"``: an in-process LRU of ``memory_bytes``. A directory path or
    ``file://DIR[?max_bytes=N]`` URL: the same LRU in front of a :class:`DiskStore` at that
    directory, bounded to N bytes if given. ``redis://[:password@]host:port/db[?ttl=SECONDS&
    disk=DIR&max_bytes=N&prefix=P]``: the LRU, then a disk tier if ``disk`` is given (bounded to
    ``max_bytes``), then Redis (entries expire after ``ttl`` seconds if given; Redis bounds its own
    memory with ``maxmemory``). ``disk_max_bytes`` is the disk budget when the spec names none.
    """
    if spec is None or spec == "memory":
        return MemoryStore(memory_bytes)
    url = urlparse(spec)
    if url.scheme in ("redis", "rediss"):
        return _redis_tiers(url, memory_bytes, disk_max_bytes)
    if url.scheme == "file":
        options = _options(spec, url, {"max_bytes"})
        disk = _disk(spec, unquote(url.path), options.get("max_bytes"), disk_max_bytes)
    elif "://" in spec:
        raise BlendRAGError(f"store {spec!r}: unknown scheme {url.scheme!r}; use a directory or 'memory'")
    else:
        disk = _disk(spec, spec, None, disk_max_bytes)
    return TieredStore([MemoryStore(memory_bytes), disk], names=["memory", "disk"])


def _options(spec: str, url, allowed: set[str]) -> dict[str, str]:
    options = {name: values[-1] for name, values in parse_qs(url.query).items()}
    unknown = set(options) - allowed
    if unknown:
        raise BlendRAGError(
            f"store {spec!r}: unknown options {sorted(unknown)}; use {', '.join(sorted(allowed))}"
        )
    return options


def _disk(spec: str, path: str, option: str | None, default: int | None) -> DiskStore:
    try:
        max_bytes = int(option) if option is not None else default
        return DiskStore(path, max_bytes=max_bytes)
    except ValueError as err:
        raise BlendRAGError(f"store {spec!r}: max_bytes must be a positive number of bytes ({err})") from None


def _redis_tiers(url, memory_bytes: int, disk_max_bytes: int | None) -> TieredStore:
    spec = url.geturl()
    options = _options(spec, url, {"ttl", "disk", "max_bytes", "prefix"})
    try:
        ttl_s = float(options["ttl"]) if "ttl" in options else None
    except ValueError:
        raise BlendRAGError(f"store {spec!r}: ttl must be a number of seconds") from None
    if ttl_s is not None and ttl_s <= 0:
        raise BlendRAGError(f"store {spec!r}: ttl must be positive")
    if "max_bytes" in options and "disk" not in options:
        raise BlendRAGError(f"store {spec!r}: max_bytes bounds the disk tier; give disk=DIR too")
    redis_url = urlunparse(url._replace(query=""))
    tiers, names = [MemoryStore(memory_bytes)], ["memory"]
    if "disk" in options:
        tiers.append(_disk(spec, options["disk"], options.get("max_bytes"), disk_max_bytes))
        names.append("disk")
    from blendrag.store.redis import DEFAULT_PREFIX, RedisStore  # needs the redis extra

    tiers.append(RedisStore(redis_url, ttl_s=ttl_s, prefix=options.get("prefix", DEFAULT_PREFIX)))
    names.append("redis")
    return TieredStore(tiers, names=names)
