"""Chunk KV on local disk, one encoded file per key: survives restarts, shared by index and server."""

from __future__ import annotations

import logging
import os
import re
import tempfile
import threading
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import torch

from blendrag.errors import BlendRAGError, CorruptEntry
from blendrag.store import codec
from blendrag.store.base import ChunkKV, KVStore, LayeredKV
from blendrag.store.recency import Recency

log = logging.getLogger(__name__)

_SUFFIX = ".kv"
_TMP_SUFFIX = ".tmp"
_RECENCY_DB = "recency.sqlite"
# Keys become file names: refuse anything that could escape the root or collide with temp files.
_KEY_RE = re.compile(r"[0-9A-Za-z_-]{2,128}")


class DiskStore(KVStore):
    """Files live at ``root/<key[:2]>/<key>.kv``; the two-character fan-out keeps directories small.

    Writes go to a temp file in the target directory, are fsynced, then renamed over the entry, so
    a reader (or a restart after a crash) sees either the old entry, the new one, or none, never a
    partial file. Temp files left by a killed writer are removed at open.

    ``max_bytes`` bounds the entries' total size: a write that takes the store over it evicts the
    least recently used entries except those this process is reading. The budget and each entry's
    last use are kept in ``root/recency.sqlite``, shared by every process on the store (None: the
    budget the store already has, if any). An entry another process is reading when it is evicted
    stays readable to that reader (its file is unlinked, not truncated) and its space returns when
    the reader is done.
    """

    def __init__(self, root: str | os.PathLike[str], max_bytes: int | None = None) -> None:
        super().__init__()
        if max_bytes is not None and max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._evicting = threading.Lock()
        self._reading: Counter[str] = Counter()  # keys this process has open for a layered read
        self._recency = Recency(self.root / _RECENCY_DB)
        self._recency.reconcile(self._scan())
        self.max_bytes = self._recency.max_bytes(max_bytes)
        self._evict_over_budget()  # a smaller budget than the store had applies at once

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
        self._hit(key)
        return kv

    def get_layered(self, keys: Sequence[str]) -> list[LayeredKV | None]:
        """Entries whose header is read and verified now, and each layer when it is asked for."""
        return [self._open_layered(key) for key in keys]

    def _open_layered(self, key: str) -> _FileLayers | None:
        path = self.path(key)
        try:
            f = open(path, "rb")  # noqa: SIM115 (held by _FileLayers until its last layer is read)
        except FileNotFoundError:
            self._count("misses")
            return None
        try:
            header = codec.read_header(f)
            size = os.fstat(f.fileno()).st_size
            expected = header.data_offset + header.payload_len
            if size != expected:
                raise CorruptEntry(f"file is {size} bytes, header says {expected} (truncated?)")
        except CorruptEntry as e:
            f.close()
            self._drop(key, e)
            self._count("misses")
            return None
        self._hit(key)
        return _FileLayers(self, key, header, f)

    def _hit(self, key: str) -> None:
        self._recency.touch(key)
        self._count("hits")

    def _drop(self, key: str, error: CorruptEntry) -> None:
        log.warning("dropping corrupt KV entry %s (%s): %s", key, self.path(key), error)
        self.delete(key)
        self._count("corrupt")

    def put(self, key: str, kv: ChunkKV) -> None:
        path = self.path(key)
        data = codec.encode(kv)
        # An entry that can never fit is skipped rather than emptying the store for it.
        if self.max_bytes is not None and len(data) > self.max_bytes:
            log.warning(
                "KV entry %s (%d bytes) exceeds the store's %d-byte budget", key, len(data), self.max_bytes
            )
            return
        try:
            _write_atomic(path, data)
        except OSError as e:
            raise BlendRAGError(f"could not write KV entry {key} to {path}: {e}") from e
        self._recency.record(key, len(data))
        self._count("puts")
        self._evict_over_budget()

    def _evict_over_budget(self) -> None:
        if self.max_bytes is None:
            return
        # One eviction at a time, each measuring the excess when it starts: two writers that each
        # measured it before the other evicted would both evict for it, and leave the store emptier
        # than its budget needs.
        with self._evicting:
            over = self._recency.total_bytes() - self.max_bytes
            while over > 0:
                with self._lock:
                    reading = set(self._reading)
                batch = [(k, size) for k, size in self._recency.oldest(len(reading) + 64) if k not in reading]
                if not batch:
                    return  # everything left is being read: over budget until those reads end
                for key, size in batch:
                    self.delete(key)
                    self._count("evictions")
                    over -= size
                    if over <= 0:
                        return

    def contains(self, key: str) -> bool:
        return self.path(key).exists()

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)
        self._recency.forget(key)

    def nbytes(self) -> int:
        return self._recency.total_bytes()

    def _count(self, *names: str) -> None:
        with self._lock:
            for name in names:
                self.stats[name] += 1

    def _pin(self, key: str, delta: int) -> None:
        with self._lock:
            self._reading[key] += delta
            if self._reading[key] <= 0:
                del self._reading[key]

    def _scan(self) -> dict[str, tuple[int, float]]:
        """key -> (size, mtime) of every entry file; temp files of killed writers are removed."""
        found = {}
        for path in self.root.glob("*/*"):
            if path.name.endswith(_TMP_SUFFIX):
                path.unlink(missing_ok=True)
            elif path.suffix == _SUFFIX:
                st = path.stat()
                found[path.stem] = (st.st_size, st.st_mtime)
        return found


class _FileLayers:
    """One entry read layer by layer from a file held open, each layer's checksum verified as it
    is read. The open file reads the same bytes whatever happens to the name meanwhile (replaced
    by the same content, or evicted by another process); it is closed after the last layer."""

    def __init__(self, store: DiskStore, key: str, header: codec.Header, f: BinaryIO) -> None:
        self._store, self._key, self._header, self._f = store, key, header, f
        self.n_layers, self.n_tokens, self.format = header.n_layers, header.shape[2], header.format.tag
        self._unread = set(range(self.n_layers))
        self._lock = threading.Lock()  # layers may be read from the loader's thread
        store._pin(key, 1)

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        with self._lock:
            if self._f.closed:
                raise CorruptEntry(f"KV entry {self._key} was closed after a failed read")
            try:
                kv = codec.read_layer(self._f, self._header, i)
            except CorruptEntry as e:
                self._close()
                self._store._drop(self._key, e)
                raise
            self._unread.discard(i)
            if not self._unread:
                self._close()
            return kv

    def _close(self) -> None:
        if not self._f.closed:
            self._f.close()
            self._store._pin(self._key, -1)

    def __del__(self) -> None:  # a prompt abandoned before its last layer
        with self._lock:
            self._close()


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
