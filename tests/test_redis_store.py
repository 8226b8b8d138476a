"""RedisStore against a real redis-server: codec, TTL, eviction, outages, corruption, tiers."""

from __future__ import annotations

import time

import pytest
import torch
from test_store import assert_bit_equal, make_kv

from blendrag.errors import BlendRAGError
from blendrag.store import ChunkKV, DiskStore, MemoryStore, RedisStore, TieredStore, open_store


def command_calls(server, command: str) -> int:
    stats = server.client().info("commandstats").get(f"cmdstat_{command}")
    return stats["calls"] if stats else 0


def test_round_trip_is_bit_exact_and_shared_between_clients(redis_server):
    a, b = RedisStore(redis_server.url), RedisStore(redis_server.url)  # two gateway replicas
    kv = make_kv()
    a.put("abc", kv)
    assert b.contains("abc")
    assert_bit_equal(b.get("abc"), kv)
    assert b.stats["hits"] == 1 and a.stats["puts"] == 1
    assert b.get("nope") is None and b.stats["misses"] == 1
    a.delete("abc")
    assert not b.contains("abc") and b.get("abc") is None
    assert a.nbytes() > 0  # the server's used memory


def test_get_many_is_one_round_trip(redis_server):
    store = RedisStore(redis_server.url)
    kvs = {f"k{i}": make_kv(seed=i) for i in range(4)}
    for key, kv in kvs.items():
        store.put(key, kv)
    before = command_calls(redis_server, "mget")
    out = store.get_many(["k2", "missing", "k0", "k3"])
    assert command_calls(redis_server, "mget") == before + 1
    assert out[1] is None
    for key, got in zip(["k2", "k0", "k3"], [out[0], out[2], out[3]], strict=True):
        assert_bit_equal(got, kvs[key])
    assert store.stats["hits"] == 3 and store.stats["misses"] == 1


def test_ttl_expires_entries(redis_server):
    store = RedisStore(redis_server.url, ttl_s=0.3)
    store.put("abc", make_kv())
    assert 0 < redis_server.client().pttl("blendrag:kv:abc") <= 300
    assert store.get("abc") is not None
    time.sleep(0.5)
    assert store.get("abc") is None and store.stats["misses"] == 1


def test_no_ttl_by_default(redis_server):
    RedisStore(redis_server.url).put("abc", make_kv())
    assert redis_server.client().pttl("blendrag:kv:abc") == -1  # -1: no expiry


@pytest.fixture
def small_redis(tmp_path, redis_server):
    """A server capped at 2 MB that evicts least-recently-used keys, as an operator would run it."""
    client = redis_server.client()
    client.config_set("maxmemory", 2 << 20)
    client.config_set("maxmemory-policy", "allkeys-lru")
    return redis_server


def test_evicted_entries_are_misses(small_redis):
    store = RedisStore(small_redis.url)
    big = ChunkKV(torch.randn(4, 2, 256, 16), torch.randn(4, 2, 256, 16))  # 256 KB an entry
    for i in range(20):  # 5 MB into a 2 MB server
        store.put(f"k{i}", big)
    got = store.get_many([f"k{i}" for i in range(20)])
    assert store.stats["puts"] == 20 and store.stats["unavailable"] == 0
    assert 0 < sum(kv is not None for kv in got) < 20
    assert got[-1] is not None  # the newest survives LRU


def test_out_of_memory_without_eviction_skips_the_write(redis_server):
    client = redis_server.client()
    client.config_set("maxmemory", 1)  # below what the server already uses: every write refused
    client.config_set("maxmemory-policy", "noeviction")
    store = RedisStore(redis_server.url, retry_s=0)
    store.put("abc", make_kv())  # no exception: a cache that cannot take a write is not a failure
    assert store.stats["puts"] == 0 and store.stats["unavailable"] == 1
    client.config_set("maxmemory", 0)
    assert store.get("abc") is None and store.available


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage"])
def test_corrupt_blob_is_dropped_and_counted(redis_server, caplog, damage):
    store, client = RedisStore(redis_server.url), redis_server.client()
    store.put("abc", make_kv())
    blob = bytearray(client.get("blendrag:kv:abc"))
    if damage == "flip":
        blob[-3] ^= 0x10
    elif damage == "truncate":
        blob = blob[: len(blob) // 2]
    else:
        blob = bytearray(b"not a KV entry at all")
    client.set("blendrag:kv:abc", bytes(blob))
    with caplog.at_level("WARNING"):
        assert store.get("abc") is None
    assert store.stats["corrupt"] == 1 and store.stats["misses"] == 1
    assert client.exists("blendrag:kv:abc") == 0
    assert "dropping corrupt KV entry abc" in caplog.text


def test_outage_degrades_to_misses_then_recovers(redis_server, caplog):
    store = RedisStore(redis_server.url, timeout_s=0.5, retry_s=0.2)
    kv = make_kv()
    store.put("abc", kv)
    redis_server.stop()
    with caplog.at_level("WARNING"):
        assert store.get("abc") is None
        store.put("def", kv)  # skipped, not raised
        assert not store.contains("abc") and store.nbytes() == 0
    assert not store.available and store.stats["unavailable"] >= 3
    assert caplog.text.count("unavailable, computing KV instead") == 1  # once per outage
    redis_server.start()  # empty again: the server keeps nothing across restarts here
    time.sleep(0.25)  # past retry_s
    store.put("abc", kv)
    assert_bit_equal(store.get("abc"), kv)
    assert store.available and "is back" in caplog.text


def test_open_store_builds_memory_disk_redis_tiers(redis_server, tmp_path):
    store = open_store(f"{redis_server.url}?ttl=60&disk={tmp_path / 'kv'}&prefix=t1:")
    assert isinstance(store, TieredStore) and store.names == ["memory", "disk", "redis"]
    assert [type(t) for t in store.tiers] == [MemoryStore, DiskStore, RedisStore]
    redis_tier = store.tiers[2]
    assert redis_tier.ttl_s == 60 and redis_tier.prefix == "t1:" and redis_tier.url == redis_server.url
    store.put("abc", make_kv())
    assert redis_server.client().exists("t1:abc") == 1 and (tmp_path / "kv" / "ab" / "abc.kv").exists()
    assert open_store(redis_server.url).names == ["memory", "redis"]


def test_tiered_get_many_fills_faster_tiers(redis_server):
    memory, remote = MemoryStore(10**7), RedisStore(redis_server.url)
    store = TieredStore([memory, remote], names=["memory", "redis"])
    remote.put("a1", make_kv(seed=1))
    memory.put("b2", make_kv(seed=2))
    before = command_calls(redis_server, "mget")
    out = store.get_many(["a1", "b2", "c3"])
    assert command_calls(redis_server, "mget") == before + 1  # only a1 and c3 went to Redis
    assert out[0] is not None and out[1] is not None and out[2] is None
    assert memory.contains("a1") and store.stats["hits"] == 2 and store.stats["misses"] == 1


@pytest.mark.parametrize(
    "spec, message",
    [
        ("redis://127.0.0.1:1/0?ttl=abc", "ttl must be a number"),
        ("redis://127.0.0.1:1/0?ttl=-1", "ttl must be positive"),
        ("redis://127.0.0.1:1/0?size=3", "unknown option"),
    ],
)
def test_open_store_rejects_bad_redis_options(spec, message):
    with pytest.raises(BlendRAGError, match=message):
        open_store(spec)
