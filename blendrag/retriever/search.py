"""Query side: embed the question, search FAISS, return chunks in a deterministic prompt order.

Order: score descending, ties broken by chunk id ascending. The order is the order the chunks
take in the prompt, and it must be a pure function of the index and the question because
the prompt is what the engine caches: the same question must give the same token sequence so
its prefix (system prompt + leading chunks) hits the prefix cache, the blend recomputes the
same tokens, and answers are reproducible. The best chunk goes first so that truncation, if
any, drops the weakest evidence.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from blendrag.errors import BlendRAGError

from .embedder import Embedder
from .index_dir import IndexDir


@dataclass(frozen=True)
class RetrievedChunk:
    id: int
    doc_id: str
    text: str
    score: float  # cosine similarity to the question
    metadata: dict  # the document's user metadata


class Retriever:
    """A read-only view of an index as it was when opened (reopen to see later updates)."""

    def __init__(self, index_dir: str | Path, embedder: Embedder | None = None):
        self.index = IndexDir(Path(index_dir))
        if self.index.docstore.counts()["chunks"] == 0:
            raise BlendRAGError(f"{self.index.path}: the index is empty (no chunks indexed yet)")
        self.embedder = embedder or Embedder(self.index.meta["embedder"])
        self.index.check_embedder(self.embedder.name)
        # In memory only: a writer may be running, and only the writer saves the FAISS file.
        self.index.sync_vectors()

    @property
    def fingerprint(self) -> str:
        """Fingerprint of the model whose KV the index holds."""
        return self.index.meta["fingerprint"]

    def search(self, question: str, top_k: int = 6) -> list[RetrievedChunk]:
        if not question.strip():
            raise BlendRAGError("the question is empty")
        if top_k < 1:
            raise BlendRAGError(f"top_k must be at least 1 (got {top_k})")
        scores, ids = self.index.vectors.search(self.embedder.embed([question]), top_k)
        hits = {int(i): float(s) for s, i in zip(scores[0], ids[0], strict=True) if i >= 0}
        rows = self.index.docstore.chunks(hits)
        chunks = [RetrievedChunk(i, doc_id, text, hits[i], meta) for i, (doc_id, text, meta) in rows.items()]
        return sorted(chunks, key=lambda c: (-c.score, c.id))

    def close(self) -> None:
        self.index.close()
