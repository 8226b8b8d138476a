"""Chunk KV by key: the one place that names a chunk's stored KV and finds or computes it.

A *segment* is a run of tokens whose KV was computed right after a *context* (the tokens it
attended to). A chunk is a segment whose context is the engine's chunk context (none, or the
prompt prefix); the prompt prefix is a segment with no context. A segment's key names the model
(fingerprint), the KV format, the context and its own token ids, so KV computed by another
model, in another format or in another context is never used.

The engine computes a missing segment (``compute``); the vLLM connector's scheduler, the indexer
and tenants use the same object for keys and lookups, without a model (``compute=None``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np

from .prompt import PromptFormat
from .store import KVStore
from .store.base import ChunkKV, LayeredKV
from .store.formats import LOSSLESS_FORMAT, KVFormat

ChunkContext = Literal["prefix", "none"]
# (context ids, segment ids) -> the segment's KV, computed after that context
ComputeSegment = Callable[[list[int], list[int]], ChunkKV]


@dataclass(frozen=True)
class ChunkKVCache:
    store: KVStore
    fingerprint: str
    prompt_format: PromptFormat
    kv_format: KVFormat  # how computed chunk KV is quantized and stored
    chunk_context: ChunkContext = "none"
    compute: ComputeSegment | None = None  # None: lookups only (a miss cannot be computed)

    @property
    def context_ids(self) -> list[int]:
        """The context every chunk is computed after."""
        return self.prompt_format.prefix_ids if self.chunk_context == "prefix" else []

    def is_prefix(self, context: list[int], ids: list[int]) -> bool:
        """Whether the segment is the prompt prefix (the system prompt), which every prompt
        reads as its first tokens, rather than a chunk."""
        return not context and ids == self.prompt_format.prefix_ids

    def segment_format(self, context: list[int], ids: list[int]) -> KVFormat:
        # The prefix is the attention sink every later token attends to: it costs almost nothing
        # kept lossless.
        if self.is_prefix(context, ids):
            return LOSSLESS_FORMAT
        return self.kv_format

    def segment_key(self, context: list[int], ids: list[int]) -> str:
        return kv_key(self.fingerprint, self.segment_format(context, ids), context, ids)

    def key(self, text: str) -> str:
        """Store key of a chunk's KV."""
        return self.segment_key(self.context_ids, self.prompt_format.chunk_ids(text))

    def contains(self, text: str) -> bool:
        return self.store.contains(self.key(text))

    def all_stored(self, chunk_ids: list[list[int]]) -> bool:
        """Whether the KV of every chunk (as token ids) is in the store; computes nothing."""
        return all(self.store.contains(self.segment_key(self.context_ids, ids)) for ids in chunk_ids)

    def delete(self, key: str) -> None:
        self.store.delete(key)

    def segments(self, context: list[int], segments: list[list[int]]) -> list[tuple[LayeredKV, bool]]:
        """Each segment's KV and whether the store had it, with one store lookup for all (one
        round trip to a remote tier); a miss is computed (once, if the list repeats it) and
        stored. Entries on disk are read layer by layer, when a buffer loads them."""
        keys = [self.segment_key(context, ids) for ids in segments]
        found = dict(zip(keys, self.store.get_layered(keys), strict=True))
        out = []
        for key, ids in zip(keys, segments, strict=True):
            hit = found[key] is not None
            if not hit:
                found[key] = self._compute_and_store(key, context, ids)
            out.append((found[key], hit))
        return out

    def precompute(self, texts: list[str]) -> int:
        """Compute and store the KV of every chunk not yet in the store; returns how many."""
        context, computed = self.context_ids, 0
        for text in texts:
            computed += not self.segments(context, [self.prompt_format.chunk_ids(text)])[0][1]
        return computed

    def _compute_and_store(self, key: str, context: list[int], ids: list[int]) -> ChunkKV:
        if self.compute is None:
            raise LookupError(f"chunk KV {key} is not stored and this cache cannot compute it")
        kv = self.compute(context, ids)
        self.store.put(key, kv)
        return kv


def kv_key(fingerprint: str, fmt: KVFormat, context: list[int], ids: list[int]) -> str:
    """Store key of a segment's KV in ``fmt``: keys name the format, so entries of different
    formats never mix (fp32 keeps the keys it had before formats existed)."""
    lossless = fmt.tag == LOSSLESS_FORMAT.tag
    return segment_key(fingerprint if lossless else f"{fingerprint}|kv={fmt.tag}", context, ids)


def segment_key(fingerprint: str, context: list[int], ids: list[int]) -> str:
    """Store key of a segment's KV: model fingerprint, context token ids and its own token ids."""
    h = hashlib.sha256(fingerprint.encode())
    h.update(np.asarray(context, dtype=np.int64).tobytes())
    h.update(b"|")
    h.update(np.asarray(ids, dtype=np.int64).tobytes())
    return h.hexdigest()
