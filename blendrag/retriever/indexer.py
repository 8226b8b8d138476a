"""Build an index incrementally: read, chunk, embed, store, precompute KV, all in one pass.

Crash safety. A run may be killed (SIGKILL) at any instruction; the index must still open and a
re-run must complete it with no duplicate and no lost chunk. The invariants that make this hold:

1. SQLite is the source of truth. A chunk exists iff its row is committed; each batch (document
   rows, chunk rows, their embedding blobs) commits in one transaction, so a batch is all in or
   all out. Chunks are identified by ``hash = sha256(doc id, text)`` (UNIQUE), so a re-run
   computes the same hashes and skips exactly the committed ones.
2. FAISS is derived from SQLite and may lag behind it, in either direction: rows committed after
   the last save (missing vectors), rows deleted after it (stale vectors). Chunk ids are never
   reused, so a vector's id always means the same chunk. The file is replaced atomically.
   Opening reconciles it from the embedding blobs (no re-embedding), so the two cannot disagree
   for a reader. It is saved at the end of a run and every ``CHECKPOINT_S`` seconds, which only
   bounds the repair work after a crash.
3. ``kv_done = 1`` means ``engine.precompute`` returned for the chunk's text. It is set after the
   chunk's row commits; a crash in between leaves ``kv_done = 0`` and the re-run precomputes
   those chunks (the KV store is content-addressed, so recomputing is idempotent). A KV entry
   lost later only costs a recompute at query time.
4. Deletion goes KV first, then SQLite, then FAISS: a crash leaves the document listed (re-run the
   delete) with at worst missing KV (recomputed on use), never orphan KV nobody can delete.
5. All inputs are read, decoded, parsed and chunked before anything is written, so bad input
   fails the run without touching the existing index.
"""

from __future__ import annotations

import hashlib
import itertools
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from tqdm import tqdm

from blendrag.errors import BlendRAGError
from blendrag.store.disk import DiskStore

from .chunker import DEFAULT_CHUNK_TOKENS, chunk_text
from .docstore import ChunkRow
from .embedder import DEFAULT_EMBEDDER, Embedder
from .index_dir import KV_DIR_NAME, IndexDir
from .reader import Document, read_documents
from .vector_index import DEFAULT_HNSW_THRESHOLD

DEFAULT_BATCH_SIZE = 32
CHECKPOINT_S = 30.0


def build_index(
    paths: Iterable[str | Path],
    index_dir: str | Path,
    engine,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    overlap: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    embedder: Embedder | None = None,
    hnsw_threshold: int = DEFAULT_HNSW_THRESHOLD,
    progress: bool | None = None,
) -> dict[str, int]:
    """Index ``paths`` into ``index_dir``; returns counts of chunks added, removed, KV computed.

    ``progress``: a progress bar on stderr (None: only when stderr is a terminal)."""
    documents = read_documents(paths)  # invariant 5: every input is checked before any write
    planned = [row for doc in documents for row in chunk_document(doc, engine, chunk_tokens, overlap)]
    with IndexDir(Path(index_dir), create=True) as index:
        index.check_fingerprint(engine)
        index.check_kv_format(engine.kv_format.tag)
        embedder = embedder or Embedder(index.meta.get("embedder", DEFAULT_EMBEDDER))
        index.check_embedder(embedder.name)
        n_removed = _remove_edited(index, engine, documents, planned)
        _write_meta(index, engine, embedder, documents)

        states = index.docstore.chunk_states()
        new = [row for row in planned if row.hash not in states]
        kv_todo = [(states[r.hash][0], r) for r in planned if r.hash in states and not states[r.hash][1]]
        index.sync_vectors(n_expected=len(states) + len(new), hnsw_threshold=hnsw_threshold)
        n_computed = _add(index, engine, embedder, documents, new, kv_todo, batch_size, progress)
        return {"added": len(new), "removed": n_removed, "kv_computed": n_computed}


def _remove_edited(index: IndexDir, engine, documents: list[Document], planned: list[ChunkRow]) -> int:
    """Drop stored chunks of the given documents that they no longer produce (edited documents)."""
    wanted = {row.hash for row in planned}
    stale = [
        i for doc in documents for h, i in index.docstore.document_chunks(doc.id).items() if h not in wanted
    ]
    if stale:
        _remove_chunks(index, engine, stale)
    return len(stale)


def _write_meta(index: IndexDir, engine, embedder: Embedder, documents: list[Document]) -> None:
    with index.docstore.transaction() as db:
        index.docstore.set_meta(
            db,
            fingerprint=engine.fingerprint,
            model_fingerprint=engine.model_fingerprint,
            adapter="none" if engine.adapter is None else engine.adapter.digest(),
            chunk_context=engine.chunk_context,
            kv_format=engine.kv_format.tag,
            embedder=embedder.name,
            dim=str(embedder.dim),
        )
        # Metadata of documents already indexed may have changed; new ones come with their chunks.
        for doc in documents:
            if index.docstore.has_document(doc.id):
                index.docstore.put_document(db, doc.id, doc.source, doc.metadata)
    index.meta = index.docstore.meta()


def _add(
    index: IndexDir,
    engine,
    embedder: Embedder,
    documents: list[Document],
    new: list[ChunkRow],
    kv_todo: list[tuple[int, ChunkRow]],
    batch_size: int,
    show_progress: bool | None,
) -> int:
    """Finish the KV of stored chunks, then embed, store and precompute new ones, batch by batch."""
    by_id = {doc.id: doc for doc in documents}
    progress = _Progress([row for _, row in kv_todo] + new, show_progress)
    last_save = time.monotonic()
    n_computed = 0
    for batch in _batched(kv_todo, batch_size):
        n_computed += _precompute(index, engine, batch, progress)
    for batch in _batched(new, batch_size):
        vectors = embedder.embed([row.text for row in batch])
        with index.docstore.transaction() as db:  # invariant 1: the batch is all in or all out
            for doc_id in dict.fromkeys(row.doc_id for row in batch):
                doc = by_id[doc_id]
                index.docstore.put_document(db, doc.id, doc.source, doc.metadata)
            ids = index.docstore.add_chunks(db, batch, vectors)
        index.vectors.add(ids, vectors)
        n_computed += _precompute(index, engine, list(zip(ids, batch, strict=True)), progress)
        if time.monotonic() - last_save > CHECKPOINT_S:
            index.save_vectors()
            last_save = time.monotonic()
    progress.close()
    index.save_vectors()
    return n_computed


def chunk_document(doc: Document, engine, chunk_tokens: int, overlap: int) -> list[ChunkRow]:
    """A document's chunks as rows, without repeats (a text repeated in a document is kept once)."""
    rows = {}
    for seq, chunk in enumerate(chunk_text(doc.text, engine.tokenizer, chunk_tokens, overlap)):
        h = content_hash(doc.id, chunk.text)
        rows.setdefault(
            h,
            ChunkRow(
                doc.id,
                seq,
                h,
                engine.chunk_kv.key(chunk.text),
                chunk.text,
                chunk.start,
                chunk.end,
                chunk.n_tokens,
            ),
        )
    return list(rows.values())


def content_hash(doc_id: str, text: str) -> str:
    return hashlib.sha256(f"{doc_id}\0{text}".encode()).hexdigest()


def delete_document(index_dir: str | Path, doc_id: str, engine) -> int:
    """Remove a document's chunks, vectors, texts and KV; returns how many chunks went."""
    with IndexDir(Path(index_dir)) as index:
        index.check_fingerprint(engine)
        if not index.docstore.has_document(doc_id):
            raise BlendRAGError(f"{index.path}: no document {doc_id!r} in this index")
        ids = list(index.docstore.document_chunks(doc_id).values())
        _remove_chunks(index, engine, ids, doc_id=doc_id)
        return len(ids)


def index_stats(index_dir: str | Path) -> dict:
    """Documents, chunks, tokens, model fingerprint, reuse adapter, chunk context (None: built
    before it was recorded), and the default ``kv/`` store's format, bytes and byte budget."""
    with IndexDir(Path(index_dir)) as index:
        stats = index.docstore.counts()
        stats["fingerprint"] = index.meta.get("fingerprint")
        stats["adapter"] = index.meta.get("adapter", "none")  # an index built before adapters has none
        stats["chunk_context"] = index.meta.get("chunk_context")
        stats["embedder"] = index.meta.get("embedder")
        stats["kv_format"] = index.kv_format
        kv_dir = index.path / KV_DIR_NAME
        kv = DiskStore(kv_dir) if kv_dir.is_dir() else None
        stats["kv_bytes"] = 0 if kv is None else kv.nbytes()
        stats["kv_max_bytes"] = None if kv is None else kv.max_bytes
        return stats


def _remove_chunks(index: IndexDir, engine, ids: list[int], doc_id: str | None = None) -> None:
    """KV first, then rows (and the document, if given), then vectors: see invariant 4."""
    for key in index.docstore.unshared_kv_keys(ids):
        engine.chunk_kv.delete(key)
    with index.docstore.transaction() as db:
        index.docstore.delete_chunks(db, ids)
        if doc_id is not None:
            index.docstore.delete_document(db, doc_id)
    index.sync_vectors()
    index.save_vectors()


def _precompute(index: IndexDir, engine, batch: list[tuple[int, ChunkRow]], progress: _Progress) -> int:
    n_computed = engine.precompute([row.text for _, row in batch])
    with index.docstore.transaction() as db:
        index.docstore.mark_kv_done(db, (i for i, _ in batch))
    progress.advance([row for _, row in batch])
    return n_computed


class _Progress:
    """Progress in tokens (tokens/s and ETA are what matter), with a chunk counter beside it."""

    def __init__(self, rows: list[ChunkRow], show: bool | None):
        total = sum(row.n_tokens for row in rows)
        # tqdm's disable=None: shown only when stderr is a terminal.
        disable = True if not rows else None if show is None else not show
        self.bar = tqdm(total=total, unit="tok", unit_scale=True, desc="indexing", disable=disable)
        self.n_chunks, self.total_chunks = 0, len(rows)

    def advance(self, rows: list[ChunkRow]) -> None:
        self.n_chunks += len(rows)
        self.bar.set_postfix(chunks=f"{self.n_chunks}/{self.total_chunks}", refresh=False)
        self.bar.update(sum(row.n_tokens for row in rows))

    def close(self) -> None:
        self.bar.close()


def _batched(items: list, size: int) -> Iterator[list]:
    it = iter(items)
    while batch := list(itertools.islice(it, size)):
        yield batch
