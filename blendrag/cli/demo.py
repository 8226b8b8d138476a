"""``blendrag demo``: index the bundled sample corpus, then answer sample questions with full
prefill and with blend side by side: each answer beside the expected one, and warm TTFTs."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from blendrag.errors import BlendRAGError

from . import common

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
MODES = ("full", "blend")


def register(subparsers: argparse._SubParsersAction) -> None:
    demo = subparsers.add_parser(
        "demo", help="index the sample corpus, then answer with full prefill and with blend"
    )
    demo.add_argument("--corpus", type=Path, default=SAMPLES / "corpus", help=argparse.SUPPRESS)
    demo.add_argument("--index-dir", type=Path, default=None, help="default: $BLENDRAG_HOME/sample-index")
    demo.add_argument(
        "--questions", type=common.positive_int, default=3, help="how many sample questions (default 3)"
    )
    demo.add_argument("--question", default=None, help="ask this question instead of the samples")
    demo.add_argument("--top-k", type=common.positive_int, default=4)
    common.add_device_args(demo)
    demo.set_defaults(func=run)


def sample_questions() -> list[dict]:
    """The bundled questions: ``question``, ``answer`` (expected), ``doc_id``."""
    return json.loads((SAMPLES / "questions.json").read_text(encoding="utf-8"))


def is_correct(answer: str, expected: str) -> bool:
    """Whether the expected answer appears in the answer, ignoring case, spacing and punctuation."""
    return _normalize(expected) in _normalize(answer)


def _normalize(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def run(args: argparse.Namespace) -> None:
    import torch

    from blendrag.loading import blendrag_home
    from blendrag.retriever.indexer import build_index
    from blendrag.retriever.search import Retriever

    if not args.corpus.is_dir():
        raise BlendRAGError(f"{args.corpus}: sample corpus not found")
    questions = (
        [{"question": args.question, "answer": None}]
        if args.question
        else sample_questions()[: args.questions]
    )
    index_dir = args.index_dir or blendrag_home() / "sample-index"
    engine = common.load_engine(None, common.index_kv_store(index_dir, None), args.device, args.dtype)
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
            out = engine.generate(chunks, q["question"], mode=mode, max_new_tokens=48)
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
    speedup = ttft["full"] / ttft["blend"]
    print(
        f"\nblend's TTFT is {speedup:.1f}x lower than full prefill's (total over {len(questions)} "
        f"question(s), warm, {torch.get_num_threads()} CPU threads)."
    )
    if wrong_blend:
        print(f"blend answered {wrong_blend} question(s) wrongly that full prefill answered right.")
