"""The index a server answers from, changed while it serves.

A ``Retriever`` is a snapshot of the index as it was when opened; after every add or delete
this class opens a fresh one, so the next search sees the change. Every method that touches the
index or the engine must run on the engine's ``ComputeWorker`` (the caller's job): writes then
never race searches, and a search never meets a half-swapped retriever.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from blendrag.errors import BlendRAGError
from blendrag.retriever import Embedder, RetrievedChunk, Retriever, build_index, delete_document
from blendrag.retriever.docstore import DB_NAME
from blendrag.retriever.index_dir import IndexDir


@dataclass(frozen=True)
class NewDocument:
    id: str
    text: str
    metadata: dict = field(default_factory=dict)


class NotFound(BlendRAGError):
    """The named document does not exist."""


class EmptyIndex(BlendRAGError):
    """No chunk is indexed yet, so there is nothing to retrieve."""


class LiveIndex:
    def __init__(self, engine, source: Retriever | str | Path) -> None:
        self.engine = engine
        self.retriever: Retriever | None = None
        self.embedder: Embedder | None = None  # loaded once, shared by every reopen and build
        if isinstance(source, Retriever):
            self.path, self.retriever, self.embedder = source.index.path, source, source.embedder
        else:
            self.path = Path(source)
            if (self.path / DB_NAME).is_file():
                self._reopen()
        if self.retriever is not None:
            self.retriever.index.check_fingerprint(engine)
        # Read by /health on the event loop: a plain value swapped whole, never a live query.
        self.counts = self._counts()

    def search(self, question: str, top_k: int) -> list[RetrievedChunk]:
        if self.retriever is None:
            raise EmptyIndex(f"{self.path}: the index is empty; add documents with POST /documents")
        return self.retriever.search(question, top_k)

    def add(self, documents: list[NewDocument]) -> dict[str, int]:
        """Chunk, embed and store ``documents`` and precompute their KV; returns build counts."""
        with tempfile.TemporaryDirectory(prefix="blendrag-upload-") as tmp:
            # build_index reads files; a jsonl file keeps the caller's ids and metadata.
            path = Path(tmp) / "documents.jsonl"
            lines = (json.dumps({"id": d.id, "text": d.text, "metadata": d.metadata}) for d in documents)
            path.write_text("\n".join(lines) + "\n", encoding="utf-8")
            # No progress bar in a server's log, terminal or not.
            counts = build_index([path], self.path, self.engine, embedder=self.embedder, progress=False)
        self._reopen()
        return counts

    def delete(self, doc_id: str) -> int:
        """Remove a document with its vectors and KV; returns how many chunks went."""
        if self.retriever is None or not self.retriever.index.docstore.has_document(doc_id):
            raise NotFound(f"no document {doc_id!r} in the index")
        n = delete_document(self.path, doc_id, self.engine)
        self._reopen()
        return n

    def _reopen(self) -> None:
        old, self.retriever = self.retriever, None
        with IndexDir(self.path) as index:
            has_chunks = index.docstore.counts()["chunks"] > 0
        if has_chunks:  # an index whose documents were all deleted cannot be searched
            self.retriever = Retriever(self.path, embedder=self.embedder)
            self.embedder = self.retriever.embedder
        if old is not None:
            old.close()
        self.counts = self._counts()

    def _counts(self) -> dict[str, int]:
        if self.retriever is None:
            return {"documents": 0, "chunks": 0}
        counts = self.retriever.index.docstore.counts()
        return {"documents": counts["documents"], "chunks": counts["chunks"]}
