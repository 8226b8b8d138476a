"""The ``blendrag`` command: index documents, answer questions, serve the API, run the demo,
train a reuse adapter.

Each subcommand's module builds its parser with argparse alone and imports the engine, torch or
the retriever only when it runs, so ``--help`` and argument errors answer at once.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from blendrag.errors import BlendRAGError

from . import demo, index, query, serve, tune


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blendrag",
        description="RAG with precomputed chunk KV caches, blended at query time.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress and warnings")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for command in (index, query, serve, demo, tune):
        command.register(subparsers)
    return parser


def sleep_at_barriers() -> None:
    """OpenMP threads that sleep at once when they wait for each other, instead of spinning for
    a while: on a CPU shared with other work the spinning holds cores the slowest thread needs
    (see bench/busy_cpu.py). libgomp reads the policy once, when torch loads it, so this must run
    before any subcommand imports torch; a user's own OMP_WAIT_POLICY or GOMP_SPINCOUNT wins."""
    if "torch" not in sys.modules and not {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & set(os.environ):
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    sleep_at_barriers()
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
