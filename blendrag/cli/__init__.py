"""The ``blendrag`` command: index documents, answer questions, serve the API, run the demo.

Each subcommand's module builds its parser with argparse alone and imports the engine, torch or
the retriever only when it runs, so ``--help`` and argument errors answer at once.
"""

from __future__ import annotations

import argparse
import logging
import sys

from blendrag.errors import BlendRAGError

from . import demo, index, query, serve


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blendrag",
        description="RAG with precomputed chunk KV caches, blended at query time.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress and warnings")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for command in (index, query, serve, demo):
        command.register(subparsers)
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
