"""The chunk-KV cache: the engine's keys and lookups, shared with model-less users."""

import pytest

from blendrag.chunk_kv import ChunkKVCache
from blendrag.store import MemoryStore
from tests.test_engine import CHUNKS


def test_a_lookup_only_cache_sees_what_the_engine_stored(tiny_engine):
    """The vLLM connector's scheduler keeps such a cache: no model, the engine's keys."""
    store = MemoryStore(1 << 30)
    engine = tiny_engine.with_store(store)
    own = engine.chunk_kv
    lookup = ChunkKVCache(store, own.fingerprint, own.prompt_format, own.kv_format, own.chunk_context)
    chunk_ids = [own.prompt_format.chunk_ids(c) for c in CHUNKS]
    assert not lookup.all_stored(chunk_ids)
    with pytest.raises(LookupError, match="cannot compute"):
        lookup.segments(lookup.context_ids, chunk_ids[:1])
    assert store.nbytes() == 0  # nothing computed, nothing stored
    assert engine.precompute(CHUNKS) == len(CHUNKS)
    assert lookup.all_stored(chunk_ids) and all(lookup.contains(c) for c in CHUNKS)
    assert [lookup.key(c) for c in CHUNKS] == [own.key(c) for c in CHUNKS]
    assert all(hit for _, hit in lookup.segments(lookup.context_ids, chunk_ids))


def test_another_store_is_another_cache(tiny_engine):
    a, b = tiny_engine.with_store(MemoryStore(1 << 30)), tiny_engine.with_store(MemoryStore(1 << 30))
    assert a.precompute(CHUNKS[:1]) == 1 and b.precompute(CHUNKS[:1]) == 1
    assert a.model is b.model is tiny_engine.model  # one model, two views
    assert a.precompute(CHUNKS[:1]) == 0
