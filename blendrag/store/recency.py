"""Which disk entries exist, their sizes and when each was last used, in SQLite: the disk store's
byte total and eviction order, shared by every process that opens the same store (an index build
and a server) and kept across restarts (file access times are unreliable: noatime, relatime)."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterable
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    key TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    last_used REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS entries_by_use ON entries (last_used);
CREATE TABLE IF NOT EXISTS settings (name TEXT PRIMARY KEY, value INTEGER);
"""


class Recency:
    """One row per entry: (key, size in bytes, last use as a wall-clock time)."""

    def __init__(self, path: Path) -> None:
        # One connection per store, shared by its threads under a lock; other processes wait up to
        # the timeout for a writer (WAL: readers never block).
        self._db = sqlite3.connect(path, timeout=30.0, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # a crash may forget a last use, no more
            self._db.executescript(_SCHEMA)

    def record(self, key: str, size: int) -> None:
        """An entry was written (or overwritten) now."""
        with self._lock:
            self._db.execute(
                "INSERT INTO entries VALUES (?, ?, ?) ON CONFLICT(key) DO UPDATE SET size=excluded.size,"
                " last_used=excluded.last_used",
                (key, size, time.time()),
            )

    def touch(self, key: str) -> None:
        """An entry was read now."""
        with self._lock:
            self._db.execute("UPDATE entries SET last_used=? WHERE key=?", (time.time(), key))

    def forget(self, key: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM entries WHERE key=?", (key,))

    def total_bytes(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COALESCE(SUM(size), 0) FROM entries").fetchone()[0]

    def oldest(self, limit: int) -> list[tuple[str, int]]:
        """Up to ``limit`` (key, size) pairs, least recently used first."""
        with self._lock:
            return self._db.execute(
                "SELECT key, size FROM entries ORDER BY last_used LIMIT ?", (limit,)
            ).fetchall()

    def reconcile(self, on_disk: dict[str, tuple[int, float]]) -> None:
        """Make the table match the files (key -> (size, mtime)): rows for files written by a
        version that kept no table or lost in a crash are added, rows of vanished files dropped."""
        with self._lock:
            known = dict(self._db.execute("SELECT key, size FROM entries").fetchall())
            self._db.execute("BEGIN")
            self._db.executemany("DELETE FROM entries WHERE key=?", ((k,) for k in known if k not in on_disk))
            self._db.executemany("INSERT OR REPLACE INTO entries VALUES (?, ?, ?)", _changed(on_disk, known))
            self._db.execute("COMMIT")

    def max_bytes(self, value: int | None = None) -> int | None:
        """The store's byte budget, set to ``value`` first if given (kept with the entries, so
        every process that opens the store honours the same budget)."""
        with self._lock:
            if value is not None:
                self._db.execute("INSERT OR REPLACE INTO settings VALUES ('max_bytes', ?)", (value,))
            row = self._db.execute("SELECT value FROM settings WHERE name='max_bytes'").fetchone()
            return None if row is None else row[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _changed(on_disk: dict[str, tuple[int, float]], known: dict[str, int]) -> Iterable[tuple]:
    return ((k, size, mtime) for k, (size, mtime) in on_disk.items() if known.get(k) != size)
