"""blendrag: RAG with precomputed chunk KV caches, blended at query time (CacheBlend)."""

from .config import BlendConfig
from .engine import BlendEngine, Generation, GenerationStream, Prefill

__all__ = ["BlendConfig", "BlendEngine", "Generation", "GenerationStream", "Prefill"]
