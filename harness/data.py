"""Datasets (JSON lists of {question, answers, ctxs}), the chunk text of a passage, and corpora
written from a dataset's passages for the indexer."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

Item = dict[str, Any]  # one dataset entry: {question, answers, ctxs: [{title, text}]}
ChunkSource = Callable[[Item], list[str]]  # the plug point for a retrieval step

DEFAULT_DATASET = Path("../shared/data/musique_dev.json")
SAMPLE_QUESTIONS = Path(__file__).resolve().parents[1] / "blendrag" / "samples" / "questions.json"


def load_dataset(path: Path, n: int | None) -> list[Item]:
    items = json.loads(path.read_text())
    if not isinstance(items, list) or not all({"question", "answers", "ctxs"} <= set(it) for it in items):
        raise ValueError(f"{path}: expected a JSON list of {{question, answers, ctxs}} objects")
    return items[:n]


def chunk_text(ctx: dict[str, str]) -> str:
    title = ctx.get("title", "").strip()
    return f"{title}\n{ctx['text']}" if title else ctx["text"]


def dataset_chunks(top_k: int) -> ChunkSource:
    """Chunks as given by the dataset (its ctxs are already ranked); a retriever would replace this."""
    return lambda item: [chunk_text(ctx) for ctx in item["ctxs"][:top_k]]


def load_prompts(path: Path, n: int | None, top_k: int) -> list[tuple[list[str], str]]:
    """(chunks, question) of the first ``n`` questions, their first ``top_k`` passages as chunks."""
    chunks_of = dataset_chunks(top_k)
    return [(chunks_of(item), item["question"]) for item in load_dataset(path, n)]


def sample_questions(path: Path = SAMPLE_QUESTIONS) -> list[str]:
    """The questions of a JSON list of {question} objects (default: the sample corpus's)."""
    return [q["question"] for q in json.loads(path.read_text())]


def write_corpus(items: list[Item], path: Path, limit: int | None = None, distinct: bool = False) -> int:
    """The passages of ``items`` (every ctx, question by question) as a ``.jsonl`` corpus, one
    document each, named ``q<question>-p<passage>``; with ``distinct`` each text only once, named
    by its hash (an index built from it is then reused by a run on more questions). Writes the
    first ``limit`` documents; returns how many."""
    docs = [
        (f"q{qi}-p{pi}", chunk_text(ctx))
        for qi, item in enumerate(items)
        for pi, ctx in enumerate(item["ctxs"])
    ]
    if distinct:
        docs = list({hashlib.sha256(text.encode()).hexdigest()[:16]: text for _, text in docs}.items())
    docs = docs[:limit]
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = (json.dumps({"id": doc_id, "text": text}) for doc_id, text in docs)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return len(docs)
