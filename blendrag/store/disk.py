"""Chunk KV on local disk, one encoded file per key: survives restarts, shared by index and server."""

from __future__ import annotations

import logging
import os
import re
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

import torch

from blendrag.errors import BlendRAGError, CorruptEntry
from blendrag.store import codec
from blendrag.store.base import ChunkKV, KVStore, LayeredKV

log = logging.getLogger(__name__)

_SUFFIX = ".kv"
_TMP_SUFFIX = ".tmp"
# Keys become file names: refuse anything that could escape the root or collide with temp files.
_KEY_RE = re.compile(r"[0-9A-Za-z_-]{2,128}")


class DiskStore(KVStore):
    """Files live at ``root/<key[:2]>/<key>.kv``; the two-character fan-out keeps directories small.

    Writes go to a temp file in the target directory, are fsynced, then renamed over the entry, so
    a reader (or a restart after a crash) sees either the old entry, the new one, or none, never a
    partial file. Temp files left by a killed writer are removed at open.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        super().__init__()
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._sizes = self._scan()  # key -> file size: keeps the running total right on overwrite
        self._total = sum(self._sizes.values())

    def path(self, key: str) -> Path:
        if not _KEY_RE.fullmatch(key):
            raise ValueError(f"invalid store key {key!r}")
        return self.root / key[:2] / f"{key}{_SUFFIX}"

    def get(self, key: str) -> ChunkKV | None:
        path = self.path(key)
        try:
            with open(path, "rb") as f:
                data = bytearray(os.fstat(f.fileno()).st_size)
                f.readinto(data)
            kv = codec.decode(data)
        except FileNotFoundError:
            self._count("misses")
            return None
        except CorruptEntry as e:
            self._drop(key, e)
            self._count("misses")
            return None
        self._count("hits")
        return kv

    def get_layered(self, keys: Sequence[str]) -> list[LayeredKV | None]:
        """Entries whose header is read and verified now, and each layer when it is asked for."""
        return [self._open_layered(key) for key in keys]

    def _open_layered(self, key: str) -> _FileLayers | None:
        path = self.path(key)
        try:
            with open(path, "rb") as f:
                header = codec.read_header(f)
                size = os.fstat(f.fileno()).st_size
            expected = header.data_offset + header.payload_len
            if size != expected:
                raise CorruptEntry(f"file is {size} bytes, header says {expected} (truncated?)")
        except FileNotFoundError:
            self._count("misses")
            return None
        except CorruptEntry as e:
            self._drop(key, e)
            self._count("misses")
            return None
        self._count("hits")
        return _FileLayers(self, key, header)

    def _drop(self, key: str, error: CorruptEntry) -> None:
        log.warning("dropping corrupt KV entry %s (%s): %s", key, self.path(key), error)
        self.delete(key)
        self._count("corrupt")

    def put(self, key: str, kv: ChunkKV) -> None:
        path = self.path(key)
        data = codec.encode(kv)
        try:
            _write_atomic(path, data)
        except OSError as e:
            raise BlendRAGError(f"could not write KV entry {key} to {path}: {e}") from e
        with self._lock:
            self._set_size(key, len(data))
            self.stats["puts"] += 1

    def contains(self, key: str) -> bool:
        return self.path(key).exists()

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)
        with self._lock:
            self._set_size(key, None)

    def nbytes(self) -> int:
        return self._total

    def _count(self, *names: str) -> None:
        with self._lock:
            for name in names:
                self.stats[name] += 1

    def _set_size(self, key: str, size: int | None) -> None:
        self._total -= self._sizes.pop(key, 0)
        if size is not None:
            self._sizes[key] = size
            self._total += size

    def _scan(self) -> dict[str, int]:
        sizes = {}
        for path in self.root.glob("*/*"):
            if path.name.endswith(_TMP_SUFFIX):
                path.unlink(missing_ok=True)
            elif path.suffix == _SUFFIX:
                sizes[path.stem] = path.stat().st_size
        return sizes


class _FileLayers:
    """One entry read layer by layer, each layer's checksum verified as it is read. The file is
    opened per read: an entry replaced meanwhile (same key, same content) reads the same."""

    def __init__(self, store: DiskStore, key: str, header: codec.Header) -> None:
        self._store, self._key, self._header = store, key, header
        self.n_layers, self.n_tokens = header.n_layers, header.shape[2]

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            with open(self._store.path(self._key), "rb") as f:
                return codec.read_layer(f, self._header, i)
        except FileNotFoundError:
            raise CorruptEntry(f"KV entry {self._key} was deleted while being read") from None
        except CorruptEntry as e:
            self._store._drop(self._key, e)
            raise


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that it appears whole or not at all."""
    path.parent.mkdir(exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.", suffix=_TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
