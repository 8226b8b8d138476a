import errno
import logging
import os
import threading

import pytest
import torch

from blendrag.errors import BlendRAGError, CorruptEntry
from blendrag.store import ChunkKV, DiskStore, MemoryStore, TieredStore, codec, open_store

_INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def make_kv(seed: int = 0, n_layers: int = 3, dtype: torch.dtype = torch.float32) -> ChunkKV:
    g = torch.Generator().manual_seed(seed)
    shape = (n_layers, 2, 5, 4)
    return ChunkKV(k=torch.randn(shape, generator=g).to(dtype), v=torch.randn(shape, generator=g).to(dtype))


def assert_bit_equal(a: ChunkKV, b: ChunkKV) -> None:
    assert a.k.dtype == b.k.dtype and a.k.shape == b.k.shape and a.v.shape == b.v.shape
    int_dtype = _INT_VIEW[a.k.dtype]
    assert torch.equal(a.k.view(int_dtype), b.k.view(int_dtype))
    assert torch.equal(a.v.view(int_dtype), b.v.view(int_dtype))


class DiskFull:
    """Stands in for ``os.fdopen``: the file takes half of a write, then fails like a full disk."""

    real_fdopen = staticmethod(os.fdopen)

    def __init__(self, fd, mode):
        self.f = self.real_fdopen(fd, mode)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def write(self, data):
        self.f.write(data[: len(data) // 2])
        self.f.flush()
        raise OSError(errno.ENOSPC, "No space left on device")


def entry_files(root) -> list[str]:
    return sorted(p.name for p in root.glob("*/*") if p.is_file())


# --- codec -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_codec_round_trip_is_bit_exact(dtype):
    kv = make_kv(dtype=dtype)
    # Values whose bits a lossy or value-based path would change.
    kv.k[0, 0, 0, :4] = torch.tensor([float("nan"), float("-inf"), -0.0, 1e-30]).to(dtype)
    out = codec.decode(codec.encode(kv))
    assert_bit_equal(out, kv)
    assert out.k.is_contiguous() and out.v.is_contiguous()


def test_codec_decodes_from_writable_buffer_without_aliasing_it():
    kv = make_kv(n_layers=1)  # one layer: K and V slices are contiguous views of the buffer
    data = bytearray(codec.encode(kv))
    header = codec.read_header(data)
    out = codec.decode(data)
    k, v = codec.decode_layer(header, 0, memoryview(data)[header.data_offset :])
    data[:] = bytes(len(data))
    assert_bit_equal(out, kv)
    assert torch.equal(k, kv.k[0]) and torch.equal(v, kv.v[0])


def test_header_carries_meta_and_layer_offsets():
    kv = make_kv(n_layers=4, dtype=torch.bfloat16)
    data = codec.encode(kv, meta={"model": "smollm2", "chunk": 7})
    header = codec.read_header(data)
    assert header.meta == {"model": "smollm2", "chunk": 7}
    assert header.format.name == "bf16" and header.shape == (4, 2, 5, 4)
    assert header.layer_len == (2 * 2 * 5 * 4 * 2,) * 4
    assert header.layer_offset(3) + header.layer_len[3] == len(data)


def test_read_layer_from_file_matches_full_decode(tmp_path):
    kv = make_kv(n_layers=4, dtype=torch.float16)
    path = tmp_path / "e.kv"
    path.write_bytes(codec.encode(kv))
    with open(path, "rb") as f:
        header = codec.read_header(f)
        for layer in (2, 0, 3):
            k, v = codec.read_layer(f, header, layer)
            assert torch.equal(k, kv.k[layer]) and torch.equal(v, kv.v[layer])


def test_decode_layer_checks_only_that_layer():
    kv = make_kv(n_layers=3)
    data = bytearray(codec.encode(kv))
    header = codec.read_header(data)
    data[header.layer_offset(1) + 5] ^= 0x01

    def layer_bytes(i):
        return data[header.layer_offset(i) : header.layer_offset(i) + header.layer_len[i]]

    k, _ = codec.decode_layer(header, 2, layer_bytes(2))
    assert torch.equal(k, kv.k[2])
    with pytest.raises(CorruptEntry, match="checksum mismatch in layer 1"):
        codec.decode_layer(header, 1, layer_bytes(1))


@pytest.mark.parametrize(
    "cut, message",
    [(lambda d, h: d[:-1], "truncated"), (lambda d, h: d[:8], "truncated prefix"),
     (lambda d, h: d[: h.data_offset - 3], "truncated header"), (lambda d, h: d + b"\0", "payload is")],
)  # fmt: skip
def test_codec_rejects_wrong_length(cut, message):
    data = codec.encode(make_kv())
    with pytest.raises(CorruptEntry, match=message):
        codec.decode(cut(data, codec.read_header(data)))


@pytest.mark.parametrize("layer", [0, 2])
def test_codec_detects_payload_bit_flip(layer):
    data = bytearray(codec.encode(make_kv()))
    header = codec.read_header(data)
    data[header.layer_offset(layer) + header.layer_len[layer] - 1] ^= 0x80
    with pytest.raises(CorruptEntry, match=f"checksum mismatch in layer {layer}"):
        codec.decode(data)


def test_codec_detects_header_damage():
    data = codec.encode(make_kv())
    header_byte = codec._PREFIX.size + 3
    flipped = bytearray(data)
    flipped[header_byte] ^= 0x04
    with pytest.raises(CorruptEntry, match="header checksum mismatch"):
        codec.decode(flipped)
    with pytest.raises(CorruptEntry, match="bad magic"):
        codec.decode(b"XXXX" + data[4:])
    with pytest.raises(CorruptEntry, match="unsupported KV entry version 9"):
        codec.decode(data[:4] + (9).to_bytes(2, "little") + data[6:])


def test_codec_refuses_mismatched_k_v():
    kv = make_kv()
    with pytest.raises(ValueError, match="equal shape"):
        codec.encode(ChunkKV(k=kv.k, v=kv.v[:, :, :3]))


# --- memory ------------------------------------------------------------------------------------


def test_memory_lru_evicts_least_recently_used_by_bytes():
    size = make_kv().nbytes
    store = MemoryStore(capacity_bytes=3 * size)
    for key in "abc":
        store.put(key, make_kv())
    assert store.get("a") is not None  # a is now the most recent; b is the oldest
    store.put("d", make_kv())
    assert [k for k in "abcd" if store.contains(k)] == ["a", "c", "d"]
    assert store.nbytes() == 3 * size and store.stats["evictions"] == 1
    store.put("big", make_kv(n_layers=6))  # needs two slots: evicts c then a
    assert [k for k in ("a", "c", "d", "big") if store.contains(k)] == ["d", "big"]
    assert store.nbytes() == 3 * size and store.stats["evictions"] == 3


def test_memory_skips_oversized_entry_and_keeps_others():
    store = MemoryStore(capacity_bytes=make_kv().nbytes)
    store.put("a", make_kv())
    store.put("huge", make_kv(n_layers=4))
    assert not store.contains("huge") and store.contains("a")
    assert store.stats["evictions"] == 0 and store.stats["puts"] == 1


def test_memory_overwrite_and_delete_keep_byte_count():
    store = MemoryStore(capacity_bytes=10**6)
    store.put("a", make_kv(n_layers=2))
    store.put("a", make_kv(n_layers=3))
    assert store.nbytes() == make_kv(n_layers=3).nbytes
    store.delete("a")
    assert store.nbytes() == 0 and store.get("a") is None and store.stats["misses"] == 1


def test_memory_is_consistent_under_threads():
    size = make_kv().nbytes
    store = MemoryStore(capacity_bytes=5 * size)

    def worker(t):
        for i in range(200):
            store.put(f"{t}-{i % 9}", make_kv())
            store.get(f"{(t + 1) % 4}-{i % 9}")

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    held = [f"{t}-{i}" for t in range(4) for i in range(9) if store.contains(f"{t}-{i}")]
    assert len(held) == 5 and store.nbytes() == 5 * size


# --- disk --------------------------------------------------------------------------------------


def test_disk_survives_restart(tmp_path):
    kv = make_kv(dtype=torch.bfloat16)
    store = DiskStore(tmp_path)
    store.put("abcdef", kv)
    assert (tmp_path / "ab" / "abcdef.kv").is_file()
    reopened = DiskStore(tmp_path)
    assert reopened.contains("abcdef")
    assert_bit_equal(reopened.get("abcdef"), kv)
    assert reopened.nbytes() == store.nbytes() == (tmp_path / "ab" / "abcdef.kv").stat().st_size
    assert reopened.stats["hits"] == 1


def test_disk_byte_count_follows_overwrite_and_delete(tmp_path):
    store = DiskStore(tmp_path)
    store.put("k1", make_kv(n_layers=2))
    store.put("k2", make_kv(n_layers=2))
    store.put("k1", make_kv(n_layers=5))
    assert store.nbytes() == sum(p.stat().st_size for p in tmp_path.rglob("*.kv"))
    store.delete("k1")
    assert store.nbytes() == (tmp_path / "k2" / "k2.kv").stat().st_size


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_disk_corrupt_entry_is_dropped_and_counted(tmp_path, caplog, damage):
    store = DiskStore(tmp_path)
    store.put("deadbeef", make_kv())
    path = tmp_path / "de" / "deadbeef.kv"
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[-10] ^= 0xFF
    else:
        del data[-100:]
    path.write_bytes(data)
    with caplog.at_level(logging.WARNING, logger="blendrag.store.disk"):
        assert store.get("deadbeef") is None
    assert "deadbeef" in caplog.text
    assert not path.exists() and store.nbytes() == 0
    assert store.stats["corrupt"] == 1 and store.stats["misses"] == 1


def test_disk_layered_read_verifies_each_layer_when_it_is_read(tmp_path, caplog):
    store = DiskStore(tmp_path)
    kv = make_kv(n_layers=3)
    store.put("deadbeef", kv)
    (layered,) = store.get_layered(["deadbeef"])
    assert (layered.n_layers, layered.n_tokens) == (3, 5) and store.stats["hits"] == 1
    for i in range(3):
        assert all(torch.equal(a, b) for a, b in zip(layered.layer(i), kv.layer(i), strict=True))

    path = tmp_path / "de" / "deadbeef.kv"
    header = codec.read_header(path.read_bytes())
    data = bytearray(path.read_bytes())
    data[header.layer_offset(1) + 3] ^= 0xFF
    path.write_bytes(data)
    (layered,) = store.get_layered(["deadbeef"])  # the header is fine: damage shows at layer 1
    layered.layer(0)
    with caplog.at_level(logging.WARNING, logger="blendrag.store.disk"), pytest.raises(CorruptEntry):
        layered.layer(1)
    assert "deadbeef" in caplog.text and not path.exists() and store.stats["corrupt"] == 1


def test_disk_layered_read_of_truncated_or_missing_entry_is_a_miss(tmp_path):
    store = DiskStore(tmp_path)
    store.put("deadbeef", make_kv())
    path = tmp_path / "de" / "deadbeef.kv"
    path.write_bytes(path.read_bytes()[:-7])
    assert store.get_layered(["deadbeef", "cafe"]) == [None, None]
    assert not path.exists() and store.stats["corrupt"] == 1 and store.stats["misses"] == 2


def test_disk_put_leaves_no_temp_files(tmp_path):
    store = DiskStore(tmp_path)
    for key in ("aa1", "aa2", "bb1"):
        store.put(key, make_kv())
    assert entry_files(tmp_path) == ["aa1.kv", "aa2.kv", "bb1.kv"]


def test_disk_failed_write_leaves_no_partial_entry(tmp_path, monkeypatch):
    store = DiskStore(tmp_path)
    old = make_kv(seed=1)
    store.put("cafe", old)
    monkeypatch.setattr(os, "fdopen", DiskFull)
    with pytest.raises(BlendRAGError, match="could not write KV entry beef.*No space left"):
        store.put("beef", make_kv())
    with pytest.raises(BlendRAGError, match="No space left"):
        store.put("cafe", make_kv(seed=2))
    monkeypatch.undo()
    assert entry_files(tmp_path) == ["cafe.kv"]
    assert not store.contains("beef") and store.stats["puts"] == 1
    assert_bit_equal(store.get("cafe"), old)  # the failed overwrite kept the previous entry
    assert store.nbytes() == (tmp_path / "ca" / "cafe.kv").stat().st_size


def test_disk_open_removes_leftover_temp_files(tmp_path):
    DiskStore(tmp_path).put("abc", make_kv())
    leftover = tmp_path / "ab" / "abd.kv.x1y2z3.tmp"
    leftover.write_bytes(b"half an entry")
    store = DiskStore(tmp_path)
    assert not leftover.exists()
    assert entry_files(tmp_path) == ["abc.kv"]
    assert store.nbytes() == (tmp_path / "ab" / "abc.kv").stat().st_size


def test_disk_rejects_keys_that_are_not_file_names(tmp_path):
    with pytest.raises(ValueError, match="invalid store key"):
        DiskStore(tmp_path).put("../escape", make_kv())


# --- tiered and factory ------------------------------------------------------------------------


def test_tiered_promotes_disk_hit_into_memory(tmp_path):
    memory, disk = MemoryStore(10**6), DiskStore(tmp_path)
    store = TieredStore([memory, disk], names=["memory", "disk"])
    kv = make_kv()
    disk.put("abc", kv)
    assert not memory.contains("abc") and store.contains("abc")
    assert_bit_equal(store.get("abc"), kv)
    assert memory.contains("abc") and memory.stats["misses"] == 1 and disk.stats["hits"] == 1
    assert store.get("abc") is not None and disk.stats["hits"] == 1  # second hit served by memory
    assert store.stats["hits"] == 2
    assert store.tier_bytes() == {"memory": kv.nbytes, "disk": disk.nbytes()}
    assert store.nbytes() == kv.nbytes + disk.nbytes()


def test_tiered_layered_disk_hit_is_promoted_once_every_layer_is_read(tmp_path):
    memory, disk = MemoryStore(10**6), DiskStore(tmp_path)
    store = TieredStore([memory, disk])
    kv = make_kv(n_layers=3)
    disk.put("abc", kv)
    layered, missing = store.get_layered(["abc", "abd"])
    assert missing is None and store.stats["hits"] == 1 and store.stats["misses"] == 1
    for i in (2, 0, 2):  # any order, repeats allowed
        layered.layer(i)
    assert not memory.contains("abc")
    layered.layer(1)
    assert_bit_equal(memory.get("abc"), kv)
    (from_memory,) = store.get_layered(["abc"])
    assert isinstance(from_memory, ChunkKV) and disk.stats["hits"] == 1


def test_tiered_put_delete_and_miss_reach_every_tier(tmp_path):
    memory, disk = MemoryStore(10**6), DiskStore(tmp_path)
    store = TieredStore([memory, disk])
    store.put("abc", make_kv())
    assert memory.contains("abc") and disk.contains("abc")
    store.delete("abc")
    assert not memory.contains("abc") and not disk.contains("abc")
    assert store.get("abc") is None and store.stats["misses"] == 1
    assert set(store.tier_bytes()) == {"MemoryStore", "DiskStore"}


def test_tiered_rolls_up_corrupt_count(tmp_path):
    disk = DiskStore(tmp_path)
    store = TieredStore([MemoryStore(10**6), disk])
    disk.put("abc", make_kv())
    (tmp_path / "ab" / "abc.kv").write_bytes(b"BRKV")
    assert store.get("abc") is None and store.stats["corrupt"] == 1


def test_open_store_specs(tmp_path):
    assert isinstance(open_store(None), MemoryStore)
    assert open_store("memory", memory_bytes=123).capacity_bytes == 123
    for spec in (str(tmp_path / "a"), f"file://{tmp_path / 'b'}"):
        store = open_store(spec)
        assert isinstance(store, TieredStore)
        assert [type(t) for t in store.tiers] == [MemoryStore, DiskStore]
    assert (tmp_path / "a").is_dir() and (tmp_path / "b").is_dir()
    with pytest.raises(BlendRAGError, match="unknown scheme 's3'"):
        open_store("s3://bucket/kv")


# --- disk byte budget --------------------------------------------------------------------------


def fill(store: DiskStore, keys: list[str]) -> int:
    """Put one entry per key (oldest first); returns the size of one entry."""
    for i, key in enumerate(keys):
        store.put(key, make_kv(seed=i))
    return len(codec.encode(make_kv()))


def test_disk_budget_evicts_least_recently_used(tmp_path):
    size = len(codec.encode(make_kv()))
    store = DiskStore(tmp_path, max_bytes=3 * size)
    fill(store, ["aa1", "aa2", "aa3"])
    assert store.get("aa1") is not None  # aa1 is now the most recently used
    store.put("aa4", make_kv(seed=4))
    assert [store.contains(k) for k in ("aa1", "aa2", "aa3", "aa4")] == [True, False, True, True]
    assert store.nbytes() == 3 * size <= store.max_bytes and store.stats["evictions"] == 1
    assert store.get("aa2") is None and store.stats["misses"] == 1  # an evicted entry is a miss


def test_disk_budget_and_recency_survive_a_restart(tmp_path):
    size = len(codec.encode(make_kv()))
    store = DiskStore(tmp_path, max_bytes=3 * size)
    fill(store, ["aa1", "aa2", "aa3"])
    store.get_layered(["aa1"])  # a layered read is a use too
    reopened = DiskStore(tmp_path)  # no budget given: the store's own
    assert reopened.max_bytes == 3 * size and reopened.nbytes() == 3 * size
    reopened.put("aa4", make_kv(seed=4))
    assert not reopened.contains("aa2") and reopened.contains("aa1")


def test_disk_budget_smaller_than_the_store_applies_at_open(tmp_path):
    size = fill(DiskStore(tmp_path), ["aa1", "aa2", "aa3", "aa4"])  # no budget: all kept
    store = DiskStore(tmp_path, max_bytes=2 * size)
    assert entry_files(tmp_path) == ["aa3.kv", "aa4.kv"] and store.stats["evictions"] == 2


def test_disk_budget_counts_entries_written_before_it_existed(tmp_path):
    size = fill(DiskStore(tmp_path), ["aa1", "aa2"])
    (tmp_path / "recency.sqlite").unlink()  # a store from before the table, or a lost table
    for suffix in ("-wal", "-shm"):
        (tmp_path / f"recency.sqlite{suffix}").unlink(missing_ok=True)
    assert DiskStore(tmp_path).nbytes() == 2 * size


def test_disk_budget_never_evicts_an_entry_being_read(tmp_path):
    size = len(codec.encode(make_kv()))
    store = DiskStore(tmp_path, max_bytes=2 * size)
    fill(store, ["aa1", "aa2"])
    reading = store.get_layered(["aa1"])[0]  # the least recently used, but open
    store.put("aa3", make_kv(seed=3))
    assert store.contains("aa1") and not store.contains("aa2")
    for i in range(reading.n_layers):  # the last layer read ends the read
        reading.layer(i)
    store.put("aa4", make_kv(seed=4))
    assert not store.contains("aa1")


def test_an_entry_evicted_by_another_process_reads_whole(tmp_path):
    """Another process (another store on the same directory) evicts an entry mid-read: the reader
    still gets every layer, each checked against its crc."""
    size = len(codec.encode(make_kv()))
    reader, writer = DiskStore(tmp_path), DiskStore(tmp_path, max_bytes=2 * size)
    fill(writer, ["aa1", "aa2"])
    entry = reader.get_layered(["aa1"])[0]
    first = entry.layer(0)
    writer.get("aa2")
    writer.put("aa3", make_kv(seed=3))  # evicts aa1, which only the reader has open
    assert not writer.contains("aa1")
    expected = make_kv(seed=0)
    assert torch.equal(first[0], expected.k[0])
    assert all(torch.equal(entry.layer(i)[1], expected.v[i]) for i in range(1, entry.n_layers))


def test_disk_budget_with_concurrent_readers_and_writers(tmp_path):
    """Readers and writers on one budget: every read is a whole entry or a miss, and the store
    ends within its budget."""
    size = len(codec.encode(make_kv()))
    store = DiskStore(tmp_path, max_bytes=4 * size)
    keys = [f"k{i:02d}" for i in range(12)]
    errors: list[BaseException] = []

    def write(offset: int) -> None:
        for i in range(offset, len(keys), 2):
            store.put(keys[i], make_kv(seed=i))

    def read() -> None:
        try:
            for _ in range(30):
                for i, key in enumerate(keys):
                    entry = store.get_layered([key])[0]
                    if entry is not None:
                        v = [entry.layer(j)[1] for j in range(entry.n_layers)]
                        assert torch.equal(torch.stack(v), make_kv(seed=i).v)
        except BaseException as e:  # noqa: BLE001 (re-raised in the main thread)
            errors.append(e)

    threads = [
        threading.Thread(target=f, args=a) for f, a in [(write, (0,)), (write, (1,)), (read, ()), (read, ())]
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and store.stats["corrupt"] == 0
    assert store.nbytes() <= store.max_bytes and len(entry_files(tmp_path)) == 4


def test_entry_larger_than_the_budget_is_skipped(tmp_path, caplog):
    store = DiskStore(tmp_path, max_bytes=100)
    store.put("aa1", make_kv())
    assert not store.contains("aa1") and "exceeds" in caplog.text


@pytest.mark.parametrize(
    "spec", ["file://{root}?max_bytes=5000", "redis://localhost:1/0?disk={root}&max_bytes=5000"]
)
def test_store_url_sets_the_disk_budget(tmp_path, spec):
    store = open_store(spec.format(root=tmp_path))
    assert store.tiers[1].max_bytes == 5000


@pytest.mark.parametrize(
    "spec, message",
    [
        ("file://{root}?max_bytes=-3", "max_bytes must be a positive"),
        ("file://{root}?max_bytes=lots", "max_bytes must be a positive"),
        ("file://{root}?maxbytes=3", "unknown options"),
        ("redis://localhost:1/0?max_bytes=3", "give disk=DIR too"),
    ],
)
def test_bad_budget_in_a_store_url_is_a_clear_error(tmp_path, spec, message):
    with pytest.raises(BlendRAGError, match=message):
        open_store(spec.format(root=tmp_path))
