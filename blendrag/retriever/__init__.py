"""Retrieval for blendrag: chunk, embed and index documents (with their KV), then search them."""

from .chunker import Chunk, chunk_text
from .embedder import Embedder
from .indexer import build_index, delete_document, index_stats
from .reader import Document, read_documents
from .search import RetrievedChunk, Retriever

__all__ = [
    "Chunk",
    "Document",
    "Embedder",
    "RetrievedChunk",
    "Retriever",
    "build_index",
    "chunk_text",
    "delete_document",
    "index_stats",
    "read_documents",
]
