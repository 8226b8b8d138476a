"""Chunk KV in Redis: one store shared by every gateway replica that points at the same server.

Values are the codec's bytes (msgpack header, per-layer crc32), so a damaged blob is detected on
read, dropped, counted and recomputed like a damaged file. Redis is a cache here, never the only
copy of anything a request needs: a key that expired (``ttl_s``) or that Redis evicted under
``maxmemory`` is a miss, and while the server is unreachable every call degrades to a miss or a
skipped write (counted in ``stats["unavailable"]``, logged once per outage), so queries compute
their KV and keep giving the same answers. The first call after ``retry_s`` tries again, so the
store recovers by itself when Redis is back.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

from blendrag.errors import CorruptEntry
from blendrag.extras import missing_extra
from blendrag.store import codec
from blendrag.store.base import ChunkKV, KVStore

try:
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry
except ImportError as err:
    raise missing_extra("redis", "the Redis KV store", err) from err

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "blendrag:kv:"
# Errors that mean "Redis cannot serve this now" (down, unreachable, or out of memory under a
# noeviction policy): the caller treats them as a miss, never as a failed request.
UNAVAILABLE = (redis.ConnectionError, redis.TimeoutError, redis.exceptions.OutOfMemoryError)


class RedisStore(KVStore):
    def __init__(
        self,
        url: str,
        *,
        ttl_s: float | None = None,
        prefix: str = DEFAULT_PREFIX,
        timeout_s: float = 2.0,
        retry_s: float = 1.0,
    ) -> None:
        super().__init__()
        # No client-side retries: a down server must cost one failed attempt, not several.
        self.client = redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0)
        )
        self.url, self.ttl_s, self.prefix, self.retry_s = url, ttl_s, prefix, retry_s
        self._down_since: float | None = None  # monotonic time of the last failure, None when up
        self._lock = threading.Lock()

    def get(self, key: str) -> ChunkKV | None:
        return self.get_many([key])[0]

    def get_many(self, keys: Sequence[str]) -> list[ChunkKV | None]:
        """All ``keys`` in one round trip (MGET)."""
        blobs = self._call(self.client.mget, [self.prefix + k for k in keys]) if keys else []
        if blobs is None:
            self._count(misses=len(keys))
            return [None] * len(keys)
        return [self._decode(key, blob) for key, blob in zip(keys, blobs, strict=True)]

    def put(self, key: str, kv: ChunkKV) -> None:
        ttl_ms = None if self.ttl_s is None else max(1, int(self.ttl_s * 1000))
        if self._call(self.client.set, self.prefix + key, codec.encode(kv), px=ttl_ms) is not None:
            self._count(puts=1)

    def contains(self, key: str) -> bool:
        return bool(self._call(self.client.exists, self.prefix + key))

    def delete(self, key: str) -> None:
        self._call(self.client.delete, self.prefix + key)

    def nbytes(self) -> int:
        """Memory the Redis server uses in all (other clients' data included); 0 while down."""
        info = self._call(self.client.info, "memory")
        return int(info["used_memory"]) if info else 0

    @property
    def available(self) -> bool:
        return self._down_since is None

    def _decode(self, key: str, blob: bytes | None) -> ChunkKV | None:
        if blob is None:  # never stored, expired, or evicted: all the same to the caller
            self._count(misses=1)
            return None
        try:
            kv = codec.decode(blob)
        except CorruptEntry as e:
            log.warning("dropping corrupt KV entry %s from Redis: %s", key, e)
            self.delete(key)
            self._count(corrupt=1, misses=1)
            return None
        self._count(hits=1)
        return kv

    def _call(self, fn, *args, **kwargs):
        """``fn(...)``, or None (counted, logged once per outage) when Redis cannot serve it.

        None is unambiguous: no command used here (MGET, SET, EXISTS, DEL, INFO) answers None."""
        down_since = self._down_since
        if down_since is not None and time.monotonic() - down_since < self.retry_s:
            self._count(unavailable=1)
            return None
        try:
            result = fn(*args, **kwargs)
        except UNAVAILABLE as e:
            if down_since is None:
                log.warning("Redis KV store %s unavailable, computing KV instead: %s", self.url, e)
            self._down_since = time.monotonic()
            self._count(unavailable=1)
            return None
        if down_since is not None:
            log.warning("Redis KV store %s is back", self.url)
            self._down_since = None
        return result

    def _count(self, **increments: int) -> None:
        with self._lock:
            for name, n in increments.items():
                self.stats[name] += n
