"""End-to-end chunks for the quality harness (``--retrieve``): every passage of the dataset goes
into one corpus indexed by the project's own indexer (chunking, embedding, FAISS, chunk KV), and
each question retrieves its top-k chunks from it, in the order ``blendrag query`` would use."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from blendrag.retriever import build_index
from blendrag.retriever.search import Retriever
from eval.quality import ChunkSource, Item, chunk_text


def write_corpus(items: list[Item], path: Path) -> int:
    """All distinct passages of ``items`` as a ``.jsonl`` corpus; returns how many."""
    passages = {}
    for item in items:
        for ctx in item["ctxs"]:
            text = chunk_text(ctx)
            passages.setdefault(hashlib.sha256(text.encode()).hexdigest()[:16], text)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = (json.dumps({"id": doc_id, "text": text}) for doc_id, text in passages.items())
    path.write_text("\n".join(lines) + "\n")
    return len(passages)


def retrieved_chunks(engine: Any, items: list[Item], index_dir: Path, top_k: int) -> ChunkSource:
    """Index the dataset's passages into ``index_dir`` (incremental: a re-run reuses it) and
    return a chunk source that retrieves from it."""
    corpus = index_dir.with_name(f"{index_dir.name}-corpus.jsonl")
    write_corpus(items, corpus)
    build_index([corpus], index_dir, engine)
    retriever = Retriever(index_dir)
    return lambda item: [chunk.text for chunk in retriever.search(item["question"], top_k)]
