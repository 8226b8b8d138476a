"""End-to-end chunks for eval.quality (``--retrieve``): every passage of the dataset goes
into one corpus indexed by the project's own indexer (chunking, embedding, FAISS, chunk KV), and
each question retrieves its top-k chunks from it, in the order ``blendrag query`` would use."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from blendrag.retriever import build_index
from blendrag.retriever.search import Retriever
from harness.data import ChunkSource, Item, write_corpus


def retrieved_chunks(engine: Any, items: list[Item], index_dir: Path, top_k: int) -> ChunkSource:
    """Index the dataset's passages into ``index_dir`` (incremental: a re-run reuses it) and
    return a chunk source that retrieves from it."""
    corpus = index_dir.with_name(f"{index_dir.name}-corpus.jsonl")
    write_corpus(items, corpus, distinct=True)
    build_index([corpus], index_dir, engine)
    retriever = Retriever(index_dir)
    return lambda item: [chunk.text for chunk in retriever.search(item["question"], top_k)]
