"""blendrag: RAG with precomputed chunk KV caches, blended at query time (CacheBlend).

The engine's names are imported on first use, so that importing a light part of the package
(the CLI's parser, the errors, the store specs) does not load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import BlendConfig
    from .engine import BlendEngine, Generation, GenerationStream, Prefill

__all__ = ["BlendConfig", "BlendEngine", "Generation", "GenerationStream", "Prefill"]
_HOME = {"BlendConfig": ".config"} | dict.fromkeys(__all__[1:], ".engine")


def __getattr__(name: str) -> object:
    if name not in _HOME:
        raise AttributeError(f"module 'blendrag' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOME[name], __name__), name)
