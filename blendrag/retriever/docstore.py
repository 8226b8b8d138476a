"""SQLite store of documents and chunks (``chunks.sqlite`` beside the FAISS file).

This is the index's source of truth: a chunk exists iff its row is committed. Each row keeps its
embedding as a float32 blob so the FAISS file can always be rebuilt or repaired without
re-embedding. Chunk ids are AUTOINCREMENT, hence never reused: a stale FAISS vector can only
point at a deleted id, never at another chunk.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DB_NAME = "chunks.sqlite"

SCHEMA = """
CREATE TABLE IF NOT EXISTS documents (
    id TEXT PRIMARY KEY,
    source TEXT NOT NULL,
    metadata TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS chunks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    hash TEXT NOT NULL UNIQUE,
    kv_key TEXT NOT NULL,
    doc_id TEXT NOT NULL REFERENCES documents(id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    text TEXT NOT NULL,
    char_start INTEGER NOT NULL,
    char_end INTEGER NOT NULL,
    n_tokens INTEGER NOT NULL,
    embedding BLOB NOT NULL,
    kv_done INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS chunks_by_doc ON chunks(doc_id, seq);
CREATE INDEX IF NOT EXISTS chunks_by_kv_key ON chunks(kv_key);
CREATE TABLE IF NOT EXISTS index_meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class ChunkRow:
    doc_id: str
    seq: int  # position of the chunk in its document
    hash: str  # sha256 of doc id and text: the chunk's identity across runs
    kv_key: str  # engine.chunk_kv.key(text); identical texts share one KV entry
    text: str
    start: int
    end: int
    n_tokens: int


class DocStore:
    def __init__(self, index_dir: Path):
        # isolation_level=None: no implicit transactions; every write goes through ``transaction``.
        # check_same_thread=False: the API server queries from worker threads; sqlite serializes.
        self.db = sqlite3.connect(index_dir / DB_NAME, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """All or nothing: a crash or an exception inside leaves the database as it was."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # -- index_meta

    def meta(self) -> dict[str, str]:
        return dict(self.db.execute("SELECT key, value FROM index_meta"))

    def set_meta(self, db: sqlite3.Connection, **values: str) -> None:
        db.executemany("INSERT OR REPLACE INTO index_meta VALUES (?, ?)", values.items())

    # -- writes (inside ``transaction``)

    def put_document(self, db: sqlite3.Connection, doc_id: str, source: str, metadata: dict) -> None:
        db.execute(
            "INSERT INTO documents VALUES (?, ?, ?) "
            "ON CONFLICT(id) DO UPDATE SET source = excluded.source, metadata = excluded.metadata",
            (doc_id, source, json.dumps(metadata, sort_keys=True)),
        )

    def add_chunks(self, db: sqlite3.Connection, rows: list[ChunkRow], vectors: np.ndarray) -> list[int]:
        ids = []
        for row, vector in zip(rows, vectors, strict=True):
            cursor = db.execute(
                "INSERT INTO chunks (hash, kv_key, doc_id, seq, text, char_start, char_end, n_tokens, "
                "embedding) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    row.hash,
                    row.kv_key,
                    row.doc_id,
                    row.seq,
                    row.text,
                    row.start,
                    row.end,
                    row.n_tokens,
                    vector.tobytes(),
                ),
            )
            ids.append(cursor.lastrowid)
        return ids

    def mark_kv_done(self, db: sqlite3.Connection, ids: Iterable[int]) -> None:
        db.executemany("UPDATE chunks SET kv_done = 1 WHERE id = ?", ((i,) for i in ids))

    def delete_chunks(self, db: sqlite3.Connection, ids: Iterable[int]) -> None:
        db.executemany("DELETE FROM chunks WHERE id = ?", ((i,) for i in ids))

    def delete_document(self, db: sqlite3.Connection, doc_id: str) -> None:
        db.execute("DELETE FROM documents WHERE id = ?", (doc_id,))  # chunks go by ON DELETE CASCADE

    # -- reads

    def chunk_states(self) -> dict[str, tuple[int, bool]]:
        """``hash -> (id, kv_done)`` of every stored chunk."""
        return {h: (i, bool(done)) for h, i, done in self.db.execute("SELECT hash, id, kv_done FROM chunks")}

    def document_chunks(self, doc_id: str) -> dict[str, int]:
        """``hash -> id`` of a document's chunks."""
        return dict(self.db.execute("SELECT hash, id FROM chunks WHERE doc_id = ?", (doc_id,)))

    def unshared_kv_keys(self, ids: list[int]) -> list[str]:
        """KV keys of chunks ``ids`` that no chunk outside ``ids`` uses (safe to delete from the store)."""
        keys = {k for i in ids for (k,) in self.db.execute("SELECT kv_key FROM chunks WHERE id = ?", (i,))}
        doomed = set(ids)
        return sorted(
            k
            for k in keys
            if all(i in doomed for (i,) in self.db.execute("SELECT id FROM chunks WHERE kv_key = ?", (k,)))
        )

    def has_document(self, doc_id: str) -> bool:
        return self.db.execute("SELECT 1 FROM documents WHERE id = ?", (doc_id,)).fetchone() is not None

    def chunk_ids(self) -> set[int]:
        return {i for (i,) in self.db.execute("SELECT id FROM chunks")}

    def vectors(self, ids: Iterable[int], dim: int) -> tuple[np.ndarray, np.ndarray]:
        """Stored embeddings of ``ids`` (sorted) as ``(ids int64[n], vectors float32[n, dim])``."""
        wanted = sorted(ids)
        blobs = [
            self.db.execute("SELECT embedding FROM chunks WHERE id = ?", (i,)).fetchone()[0] for i in wanted
        ]
        vectors = np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(len(wanted), dim)
        return np.asarray(wanted, dtype=np.int64), vectors

    def chunks(self, ids: Iterable[int]) -> dict[int, tuple[str, str, dict]]:
        """``id -> (doc_id, text, document metadata)``."""
        found = {}
        for i in ids:
            row = self.db.execute(
                "SELECT c.doc_id, c.text, d.metadata FROM chunks c JOIN documents d ON d.id = c.doc_id "
                "WHERE c.id = ?",
                (i,),
            ).fetchone()
            if row is not None:
                found[i] = (row[0], row[1], json.loads(row[2]))
        return found

    def counts(self) -> dict[str, int]:
        documents = self.db.execute("SELECT COUNT(*) FROM documents").fetchone()[0]
        chunks, tokens, kv_done = self.db.execute(
            "SELECT COUNT(*), COALESCE(SUM(n_tokens), 0), COALESCE(SUM(kv_done), 0) FROM chunks"
        ).fetchone()
        return {"documents": documents, "chunks": chunks, "tokens": tokens, "kv_done": kv_done}
