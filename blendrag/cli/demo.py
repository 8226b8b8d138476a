"""``blendrag demo``: index the bundled sample corpus, then answer sample questions with full
prefill and with blend side by side: each answer beside the expected one, and warm TTFTs."""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from blendrag.errors import BlendRAGError
from blendrag.request import DEFAULT_TOP_K

from . import common

if TYPE_CHECKING:
    from blendrag.engine import BlendEngine, Generation

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
MODES = ("full", "blend")
DEFAULT_QUESTIONS = 3
MAX_NEW_TOKENS = 48  # the sample answers are a few words; a longer ramble only costs time


def register(subparsers: argparse._SubParsersAction) -> None:
    demo = subparsers.add_parser(
        "demo", help="index the sample corpus, then answer with full prefill and with blend"
    )
    demo.add_argument("--corpus", type=Path, default=SAMPLES / "corpus", help=argparse.SUPPRESS)
    demo.add_argument("--index-dir", type=Path, default=None, help="default: $BLENDRAG_HOME/sample-index")
    demo.add_argument(
        "--questions",
        type=common.positive_int,
        default=DEFAULT_QUESTIONS,
        help=f"how many sample questions (default {DEFAULT_QUESTIONS})",
    )
    demo.add_argument("--question", default=None, help="ask this question instead of the samples")
    demo.add_argument("--top-k", type=common.positive_int, default=DEFAULT_TOP_K)
    common.add_device_args(demo)
    demo.set_defaults(func=run)


def sample_questions() -> list[dict]:
    """The bundled questions: ``question``, ``answer`` (expected), ``doc_id``."""
    return json.loads((SAMPLES / "questions.json").read_text(encoding="utf-8"))


def is_correct(answer: str, expected: str) -> bool:
    """Whether the expected answer appears in the answer as whole words, ignoring case, spacing
    and punctuation (so "41 meters" is not found in "141 meters")."""
    return f" {_normalize(expected)} " in f" {_normalize(answer)} "


def _normalize(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def drop_stale_sample_index(index_dir: Path, engine: BlendEngine) -> None:
    """The default sample index is the demo's own cache: one that indexing would refuse for this
    engine (built with another model, dtype, reuse adapter, chunk context or KV format, by an
    earlier version or an earlier run with other flags) is removed, to be built again, instead of
    refusing to run."""
    from blendrag.retriever.docstore import DB_NAME
    from blendrag.retriever.index_dir import IndexDir

    if not (index_dir / DB_NAME).is_file():
        return
    with IndexDir(index_dir) as index:
        try:  # the checks build_index makes
            index.check_fingerprint(engine)
            index.check_kv_format(engine.kv_format.tag)
            return
        except BlendRAGError:
            pass
    settings = "model, dtype, reuse adapter, chunk context or KV format"
    print(f"{index_dir} was built with another {settings}: rebuilding it")
    shutil.rmtree(index_dir)


def run(args: argparse.Namespace) -> None:
    import torch

    from blendrag.loading import blendrag_home
    from blendrag.retriever.indexer import build_index
    from blendrag.retriever.search import Retriever
    from blendrag.store import open_store

    if not args.corpus.is_dir():
        raise BlendRAGError(f"{args.corpus}: sample corpus not found")
    questions = (
        [{"question": args.question, "answer": None}]
        if args.question
        else sample_questions()[: args.questions]
    )
    if args.index_dir is None:
        index_dir = blendrag_home() / "sample-index"
        engine = common.load_engine(args, None)
        drop_stale_sample_index(index_dir, engine)
    else:
        index_dir = args.index_dir
        engine = common.load_engine(args, None, index_dir)
    engine = engine.with_store(open_store(common.index_kv_store(index_dir, None)))
    print(f"indexing {args.corpus} into {index_dir} ...")
    build_index([args.corpus], index_dir, engine)
    retriever = Retriever(index_dir)
    common.warm_up(engine)
    ttft = {mode: 0.0 for mode in MODES}
    wrong_blend = 0
    for q in questions:
        chunks = [c.text for c in retriever.search(q["question"], args.top_k)]
        print(f"\nQ: {q['question']}")
        if q["answer"] is not None:
            print(f"   expected: {q['answer']}")
        correct = {}
        for mode in MODES:
            out = answer(engine, chunks, q["question"], mode)
            s = out.stats
            ttft[mode] += s.ttft_s
            mark = ""
            if q["answer"] is not None:
                correct[mode] = is_correct(out.text, q["answer"])
                mark = "✓ " if correct[mode] else "✗ "
            print(
                f"   {mode:<5} {mark}{out.text.strip()!r}\n"
                f"         TTFT {s.ttft_s:.3f} s, {s.n_recomputed} of {s.n_tokens} tokens computed"
            )
        if correct.get("full") and not correct.get("blend"):
            wrong_blend += 1
            print("   blend is wrong here where full prefill is right.")
    print(
        f"\nTTFT over {len(questions)} question(s), warm, {torch.get_num_threads()} CPU threads: "
        f"full prefill {ttft['full']:.2f} s, blend {ttft['blend']:.2f} s "
        f"({ttft['full'] / ttft['blend']:.1f}x)."
    )
    if wrong_blend:
        print(f"blend answered {wrong_blend} question(s) wrongly that full prefill answered right.")


def answer(engine: BlendEngine, chunks: list[str], question: str, mode: str) -> Generation:
    """One answer as the demo asks for it (greedy, at most ``MAX_NEW_TOKENS``)."""
    return engine.generate(chunks, question, mode=mode, max_new_tokens=MAX_NEW_TOKENS)
