"""``blendrag demo``: its sample questions, its answer check, and (slow) the real model's answers."""

from __future__ import annotations

import pytest
import torch

from blendrag import BlendEngine
from blendrag.adapter import ReuseAdapter
from blendrag.cli import build_parser, demo
from blendrag.errors import BlendRAGError
from blendrag.retriever import Retriever, build_index
from blendrag.retriever.docstore import DB_NAME
from blendrag.retriever.index_dir import IndexDir
from blendrag.store import MemoryStore

CORPUS = demo.SAMPLES / "corpus"


def test_every_sample_answer_is_in_its_document():
    questions = demo.sample_questions()
    assert len(questions) >= demo.DEFAULT_QUESTIONS
    for q in questions:
        text = (CORPUS / q["doc_id"]).read_text(encoding="utf-8")
        assert demo.is_correct(text, q["answer"]), q


@pytest.mark.parametrize(
    ("answer", "expected", "correct"),
    [
        ("The tower is 41 meters tall.", "41 meters", True),
        ("It is 41 Meters\ntall", "41 meters", True),
        ("The tower is 141 meters tall.", "41 meters", False),
        ("It serves 16.", "6", False),
        ("The flag `--legacy-wal` is deprecated.", "--legacy-wal", True),
        ("On 12 March 1961.", "12 March 1961", True),
        ("", "Sparrow", False),
    ],
)
def test_is_correct_matches_whole_words(answer, expected, correct):
    assert demo.is_correct(answer, expected) is correct


def test_demo_prints_each_answer_beside_the_expected_one(tiny_engine, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo.common, "load_engine", lambda *args: tiny_engine)
    args = build_parser().parse_args(["demo", "--questions", "2", "--index-dir", str(tmp_path / "index")])
    args.func(args)
    out = capsys.readouterr().out
    for q in demo.sample_questions()[:2]:
        assert f"Q: {q['question']}\n   expected: {q['answer']}\n   full  " in out
    assert out.count("   blend ") == 2
    assert "TTFT over 2 question(s), warm," in out


def test_a_sample_index_built_otherwise_is_rebuilt_and_a_given_one_refused(
    tiny_engine, tiny_dirs, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("BLENDRAG_HOME", str(tmp_path))
    monkeypatch.setattr(demo.common, "load_engine", lambda *args: tiny_engine)
    header = torch.randn(2, tiny_engine.model.args.dim, generator=torch.Generator().manual_seed(0))
    other = BlendEngine.from_pretrained(  # the same model, with a reuse adapter
        str(tiny_dirs["llama"]), store=MemoryStore(1 << 30), kv_format="fp32", adapter=ReuseAdapter(header)
    )
    for index_dir in (tmp_path / "sample-index", tmp_path / "mine"):
        build_index([CORPUS], index_dir, other)
    args = build_parser().parse_args(["demo", "--questions", "1"])
    args.func(args)
    assert (
        "was built with another model, dtype, reuse adapter, chunk context or KV format: rebuilding it"
        in capsys.readouterr().out
    )
    with IndexDir(tmp_path / "sample-index") as index:
        assert index.meta["fingerprint"] == tiny_engine.fingerprint
    args = build_parser().parse_args(["demo", "--questions", "1", "--index-dir", str(tmp_path / "mine")])
    # (chunk context none, with an adapter, against the tiny engine's prefix and none)
    with pytest.raises(BlendRAGError, match="index was built with chunk context none, not prefix"):
        args.func(args)
    assert (tmp_path / "mine" / DB_NAME).is_file()  # the user's own index is never removed


@pytest.mark.slow
def test_full_prefill_answers_the_default_questions(smol_engine, tmp_path):
    """The questions `blendrag demo` asks by default, retrieved and answered as it does."""
    build_index([CORPUS], tmp_path / "index", smol_engine)
    retriever = Retriever(tmp_path / "index")
    for q in demo.sample_questions()[: demo.DEFAULT_QUESTIONS]:
        chunks = [c.text for c in retriever.search(q["question"], demo.DEFAULT_TOP_K)]
        out = demo.answer(smol_engine, chunks, q["question"], "full")
        assert demo.is_correct(out.text, q["answer"]), (q, out.text)
