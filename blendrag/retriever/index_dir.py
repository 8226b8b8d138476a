"""An index directory opened as one consistent whole: SQLite rows, FAISS vectors and metadata.

Layout: ``chunks.sqlite`` (source of truth), ``vectors.faiss`` (derived from the embedding
blobs, may lag), ``kv/`` (default KV store of the engine). Opening reconciles FAISS with SQLite,
so readers never see a vector without a chunk or a chunk without a vector.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from blendrag.errors import BlendRAGError

from .docstore import DB_NAME, DocStore
from .vector_index import VectorIndex

if TYPE_CHECKING:
    from blendrag.engine import BlendEngine

VECTORS_NAME = "vectors.faiss"
KV_DIR_NAME = "kv"


class IndexDir:
    def __init__(self, path: Path, create: bool = False):
        self.path = Path(path)
        if not create and not (self.path / DB_NAME).is_file():
            raise BlendRAGError(f"{self.path}: no index here (build one with `blendrag index`)")
        self.path.mkdir(parents=True, exist_ok=True)
        self.docstore = DocStore(self.path)
        self.meta = self.docstore.meta()
        self.vectors: VectorIndex | None = None

    def close(self) -> None:
        self.docstore.close()

    def __enter__(self) -> IndexDir:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def check_fingerprint(self, engine: BlendEngine) -> None:
        """The index's chunk KV was made by ``engine``'s model and reuse adapter, after the same
        chunk context, else a clear error naming which of them differs."""
        built_with = self.meta.get("fingerprint")
        if built_with is None:
            return
        # Chunk KV keys name their context: under another one, every chunk would miss and be
        # recomputed, silently. (An index built before the context was recorded is not checked.)
        context = self.meta.get("chunk_context", engine.chunk_context)
        if context != engine.chunk_context:
            raise BlendRAGError(
                f"{self.path}: index was built with chunk context {context}, not {engine.chunk_context}; "
                "open it with the chunk context it was built with or index into a new --index-dir"
            )
        if built_with == engine.fingerprint:
            return
        ours = "none" if engine.adapter is None else engine.adapter.digest()
        # An index built without an adapter holds the bare model's fingerprint.
        if built_with == engine.model_fingerprint:
            theirs = "none"
        elif self.meta.get("model_fingerprint") == engine.model_fingerprint:
            theirs = self.meta.get("adapter", "?")
        else:
            raise BlendRAGError(
                f"{self.path}: index was built with model {built_with}, not the loaded model "
                f"{engine.fingerprint}; use the same --model or index into a new --index-dir"
            )
        raise BlendRAGError(
            f"{self.path}: index was built with reuse adapter {theirs}, not {ours}; use the --adapter "
            "it was built with (none, bundled or its file) or index into a new --index-dir"
        )

    @property
    def kv_format(self) -> str | None:
        """The KV format the index's chunks were precomputed in (None: a new index). An index
        built before formats existed holds fp32."""
        return self.meta.get("kv_format") or ("fp32" if "fingerprint" in self.meta else None)

    def check_kv_format(self, tag: str) -> None:
        if self.kv_format is not None and self.kv_format != tag:
            raise BlendRAGError(
                f"{self.path}: index holds KV in format {self.kv_format}, not {tag}; "
                f"use --kv-format {self.kv_format} or index into a new --index-dir"
            )

    def check_embedder(self, name: str) -> None:
        built_with = self.meta.get("embedder")
        if built_with is not None and built_with != name:
            raise BlendRAGError(f"{self.path}: index was embedded with {built_with}, not {name}")

    def sync_vectors(self, n_expected: int = 0, hnsw_threshold: int | None = None) -> None:
        """Make FAISS hold exactly the vectors of the SQLite rows, from the stored embedding blobs.

        With ``hnsw_threshold`` the kind (flat or HNSW) is chosen for ``n_expected`` vectors and a
        mismatching index is rebuilt; without it the stored kind is kept (readers never switch).
        """
        dim = int(self.meta["dim"])
        truth = self.docstore.chunk_ids()
        current = self.vectors or self._load_vectors()
        hnsw = current is not None and current.is_hnsw
        if hnsw_threshold is not None:
            hnsw = max(len(truth), n_expected) >= hnsw_threshold
        have = current.ids() if current is not None else set()
        stale = sorted(have - truth)
        # HNSW graphs cannot drop nodes: removing from one means rebuilding it.
        if current is None or current.is_hnsw != hnsw or (stale and hnsw):
            current, have, stale = VectorIndex.empty(dim, hnsw), set(), []
        if stale:
            current.remove(stale)
        current.add(*self.docstore.vectors(truth - have, dim))
        self.vectors = current

    def save_vectors(self) -> None:
        self.vectors.save(self.path / VECTORS_NAME)

    def _load_vectors(self) -> VectorIndex | None:
        path = self.path / VECTORS_NAME
        if not path.is_file():
            return None
        try:
            return VectorIndex.load(path)
        except RuntimeError:  # damaged from outside (writes are atomic): rebuilt from SQLite
            return None
