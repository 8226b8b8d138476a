"""FAISS inner-product index keyed by chunk id (the SQLite ``chunks.id``).

Exact flat search below ``hnsw_threshold`` vectors, HNSW above it (flat search is linear in the
corpus). The file on disk is replaced atomically, so a crash leaves the previous version whole;
it may lag behind SQLite, which is the source of truth (see ``indexer``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from blendrag.extras import missing_extra

try:
    import faiss
except ImportError as err:
    raise missing_extra("retriever", "blendrag's retriever", err) from err

DEFAULT_HNSW_THRESHOLD = 50_000  # vectors; from here on HNSW instead of exact flat search
HNSW_NEIGHBORS = 32


class VectorIndex:
    def __init__(self, index: faiss.IndexIDMap2):
        self.index = index
        self._gpu_index = None  # search-only GPU copy, dropped on every change

    @classmethod
    def empty(cls, dim: int, hnsw: bool) -> VectorIndex:
        if hnsw:
            base = faiss.IndexHNSWFlat(dim, HNSW_NEIGHBORS, faiss.METRIC_INNER_PRODUCT)
        else:
            base = faiss.IndexFlatIP(dim)
        return cls(faiss.IndexIDMap2(base))

    @classmethod
    def load(cls, path: Path) -> VectorIndex:
        return cls(faiss.read_index(str(path)))

    def save(self, path: Path) -> None:
        """Write to a temp file, fsync, then ``os.replace``: readers see the old or the new file."""
        data = faiss.serialize_index(self.index)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(data.tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    @property
    def is_hnsw(self) -> bool:
        return isinstance(faiss.downcast_index(self.index.index), faiss.IndexHNSW)

    @property
    def ntotal(self) -> int:
        return self.index.ntotal

    def ids(self) -> set[int]:
        return set(faiss.vector_to_array(self.index.id_map).tolist())

    def add(self, ids: np.ndarray | list[int], vectors: np.ndarray) -> None:
        if len(ids):
            self.index.add_with_ids(
                np.ascontiguousarray(vectors, dtype=np.float32), np.asarray(ids, dtype=np.int64)
            )
            self._gpu_index = None

    def remove(self, ids: list[int]) -> None:
        """Flat only: HNSW graphs cannot drop nodes."""
        self.index.remove_ids(np.asarray(ids, dtype=np.int64))
        self._gpu_index = None

    def search(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Scores and ids of the ``k`` nearest rows for each query row; id -1 pads short results."""
        return self._searcher().search(np.ascontiguousarray(query, dtype=np.float32), k)

    def _searcher(self):
        # GPU FAISS has no HNSW; the flat index is copied to the GPUs the first time it is searched.
        if self.is_hnsw or faiss.get_num_gpus() == 0:
            return self.index
        if self._gpu_index is None:
            self._gpu_index = faiss.index_cpu_to_all_gpus(self.index)
        return self._gpu_index
