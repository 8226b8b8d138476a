"""The prompts a reuse adapter was trained on, rebuilt from the dev files its card lists, in its
training order (the first ones validate), as the JSON file ``blendrag tune --data`` reads:

    python -m eval.tune_prompts blendrag/adapters/SmolLM2-135M-Instruct.json --out runs/adapter-prompts.json

The card's ``prompts`` are ``[file, position]`` pairs: a data set file under ``--data-dir`` and the
0-based position of the question in its list.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from harness.report import write_json


def training_prompts(card: dict[str, Any], data_dir: Path) -> list[dict[str, Any]]:
    """The card's prompts, each read from its file (each file read once)."""
    files = {name: json.loads((data_dir / name).read_text()) for name in {f for f, _ in card["prompts"]}}
    return [files[name][position] for name, position in card["prompts"]]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m eval.tune_prompts", description=__doc__.split("\n\n")[0])
    parser.add_argument("card", type=Path, help="an adapter's card (JSON with a prompts list)")
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        prompts = training_prompts(json.loads(args.card.read_text()), args.data_dir)
    except (OSError, ValueError, KeyError, IndexError, TypeError) as err:
        parser.error(f"{args.card}: {type(err).__name__}: {err}")  # one line, exit 2
    write_json(args.out, prompts)
    print(f"{args.out}: {len(prompts)} prompts")


if __name__ == "__main__":
    main()
