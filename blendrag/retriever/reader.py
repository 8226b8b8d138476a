"""Read and validate the documents to index: ``.txt``, ``.md`` and ``.jsonl`` files and folders.

Everything is read and checked up front, so a bad input stops the run before the index is
touched. Errors are one line naming the file (and line, when there is one).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from blendrag.errors import BlendRAGError

TEXT_SUFFIXES = (".txt", ".md")
SUFFIXES = (*TEXT_SUFFIXES, ".jsonl")


@dataclass(frozen=True)
class Document:
    id: str  # the jsonl "id", or the file path relative to the root it was found under
    source: str  # file it came from
    text: str
    metadata: dict
    where: str  # "file" or "file:line", for error messages


def read_documents(paths: Iterable[str | Path]) -> list[Document]:
    """All documents under ``paths``, folders walked recursively in sorted order."""
    if isinstance(paths, str | Path):  # one path, not an iterable of characters
        paths = [paths]
    documents: dict[str, Document] = {}
    for root in map(Path, paths):
        for path, base in _files(root):
            for doc in _read_file(path, base):
                seen = documents.get(doc.id)
                if seen is not None and seen.where != doc.where:
                    raise BlendRAGError(
                        f"{doc.where}: duplicate document id {doc.id!r} (first in {seen.where})"
                    )
                documents[doc.id] = doc
    return list(documents.values())


def _files(root: Path) -> list[tuple[Path, Path]]:
    """``(file, base)`` pairs; document ids of text files are relative to ``base``."""
    if not root.exists():
        raise BlendRAGError(f"{root}: no such file or directory")
    if root.is_file():
        if root.suffix not in SUFFIXES:
            raise BlendRAGError(f"{root}: unsupported file type (expected .txt, .md or .jsonl)")
        return [(root, root.parent)]
    files = sorted(
        p
        for p in root.rglob("*")
        if p.is_file()
        and p.suffix in SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    if not files:
        raise BlendRAGError(f"{root}: no .txt, .md or .jsonl files in this folder")
    return [(p, root) for p in files]


def _read_file(path: Path, base: Path) -> list[Document]:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise BlendRAGError(f"{path}:{line}: not valid UTF-8 (byte {e.start})") from None
    if not text.strip():
        raise BlendRAGError(f"{path}: empty file")
    if path.suffix in TEXT_SUFFIXES:
        return [Document(path.relative_to(base).as_posix(), str(path), text, {}, str(path))]
    return [_parse_record(path, n, line) for n, line in enumerate(text.split("\n"), 1) if line.strip()]


def _parse_record(path: Path, n: int, line: str) -> Document:
    """One jsonl line: ``{"id": str | int, "text": str, "metadata": {...}}`` (metadata optional)."""
    where = f"{path}:{n}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise BlendRAGError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(record, dict):
        raise BlendRAGError(f'{where}: expected a JSON object with "id" and "text"')
    doc_id, text, metadata = record.get("id"), record.get("text"), record.get("metadata", {})
    if isinstance(doc_id, bool) or not isinstance(doc_id, str | int) or doc_id == "":
        raise BlendRAGError(f'{where}: lacks an "id" (a string or an integer)')
    if not isinstance(text, str) or not text.strip():
        raise BlendRAGError(f'{where}: lacks a non-empty "text" string')
    if not isinstance(metadata, dict):
        raise BlendRAGError(f'{where}: "metadata" must be a JSON object')
    return Document(str(doc_id), str(path), text, metadata, where)
