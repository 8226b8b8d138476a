"""``blendrag`` command line: index, query, serve, demo. A user error prints one line and exits 2."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .errors import BlendRAGError

REPO_SAMPLES = Path(__file__).resolve().parents[1] / "samples"


def _add_demo(subparsers: argparse._SubParsersAction) -> None:
    demo = subparsers.add_parser(
        "demo", help="index the sample corpus, then answer with blend and full prefill"
    )
    demo.add_argument("--corpus", type=Path, default=REPO_SAMPLES / "corpus")
    demo.add_argument("--index-dir", type=Path, default=None, help="default: $BLENDRAG_HOME/sample-index")
    demo.add_argument("--question", default=None, help="default: the first of samples/questions.json")
    demo.add_argument("--top-k", type=int, default=4)
    demo.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> None:
    from blendrag.loading import blendrag_home
    from blendrag.retriever.commands import load_engine
    from blendrag.retriever.index_dir import KV_DIR_NAME
    from blendrag.retriever.indexer import build_index
    from blendrag.retriever.search import Retriever

    if not args.corpus.is_dir():
        raise BlendRAGError(
            f"{args.corpus}: sample corpus not found (run from the repository, or pass --corpus)"
        )
    index_dir = args.index_dir or blendrag_home() / "sample-index"
    question = args.question or json.loads((REPO_SAMPLES / "questions.json").read_text())[0]["question"]
    engine = load_engine(None, str(index_dir / KV_DIR_NAME))
    print(f"indexing {args.corpus} into {index_dir} ...")
    build_index([args.corpus], index_dir, engine)
    chunks = [c.text for c in Retriever(index_dir).search(question, args.top_k)]
    print(f"\nquestion: {question}  ({len(chunks)} chunks retrieved)\n")
    print(f"{'mode':<6} {'TTFT (s)':>9} {'recomputed':>11}  answer")
    results = {
        mode: engine.generate(chunks, question, mode=mode, max_new_tokens=48) for mode in ("full", "blend")
    }
    for mode, out in results.items():
        s = out.stats
        print(
            f"{mode:<6} {s['ttft_s']:>9.3f} {s['n_recomputed']:>5}/{s['n_tokens']:<5}  {out.text.strip()!r}"
        )
    speedup = results["full"].stats["ttft_s"] / results["blend"].stats["ttft_s"]
    print(f"\nblend TTFT is {speedup:.1f}x lower than full prefill on this machine")


def build_parser() -> argparse.ArgumentParser:
    from blendrag.api.serve import register as register_serve
    from blendrag.retriever.commands import register

    parser = argparse.ArgumentParser(prog="blendrag", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress and warnings")
    subparsers = parser.add_subparsers(dest="command", required=True)
    register(subparsers)
    register_serve(subparsers)
    _add_demo(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )
    try:
        args.func(args)
    except BlendRAGError as err:
        print(f"blendrag: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("blendrag: interrupted (the index stays consistent; re-run to resume)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
