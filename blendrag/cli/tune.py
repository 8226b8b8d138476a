"""``blendrag tune``: train a reuse adapter for a model by self-distillation (``blendrag.tune``)."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from blendrag.errors import BlendRAGError

from . import common


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "tune",
        help="train a reuse adapter: chunk KV that blends closer to full prefill",
        description="Train a reuse adapter (a few vectors every chunk is precomputed after) so that "
        "blending matches full prefill's next-token distributions on your prompts. No labels: the "
        "model's own full-prefill answers are the targets. Use it with --adapter OUT/adapter.safetensors.",
    )
    p.add_argument(
        "--data",
        type=Path,
        action="append",
        required=True,
        help="JSON list of {question, ctxs}; repeatable: prompts are taken from the files in turn, "
        "so validation and training draw on each",
    )
    p.add_argument("--out", type=Path, required=True, help="directory for the adapter and checkpoints")
    p.add_argument("--model", help="local checkpoint directory (default: the bundled model)")
    p.add_argument("--skip", type=int, default=0, help="skip the first SKIP prompts of each file (held out)")
    p.add_argument("--limit", type=common.positive_int, help="use at most LIMIT prompts of each file")
    p.add_argument(
        "--val", type=common.positive_int, default=8, help="prompts kept for validation (default 8)"
    )
    p.add_argument("--chunks", type=common.positive_int, default=3, help="passages per prompt (default 3)")
    p.add_argument(
        "--chunk-chars", type=common.positive_int, default=1000, help="characters per passage (default 1000)"
    )
    p.add_argument(
        "--tokens",
        type=common.positive_int,
        help="header vectors, started as the prompt prefix's first TOKENS tokens (default: all of them)",
    )
    p.add_argument(
        "--answer-tokens",
        type=common.positive_int,
        default=16,
        help="answer positions distilled (default 16)",
    )
    p.add_argument("--lr", type=common.positive_float, default=3e-3, help="Adam learning rate (default 3e-3)")
    p.add_argument("--minutes", type=common.positive_float, default=30.0, help="time budget (default 30)")
    p.add_argument("--steps", type=common.positive_int, help="stop after this many steps")
    p.add_argument("--checkpoint-every", type=common.positive_int, default=20, help="steps (default 20)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from OUT's last checkpoint")
    common.add_device_args(p)
    p.set_defaults(func=run, adapter="none")  # the adapter is trained for the bare model


def run(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from blendrag.tune import ADAPTER_FILE, TuneSettings, in_turn, load_examples, tune

    per_file = []
    for path in args.data:
        found = load_examples(path, args.chunks, args.chunk_chars)[args.skip :]
        per_file.append(found[: args.limit] if args.limit else found)
    examples = in_turn(per_file)
    val, train = examples[: args.val], examples[args.val :]
    if not train:
        raise BlendRAGError(
            f"{len(examples)} prompts, all kept for validation (--val {args.val}): none to train on"
        )
    settings = TuneSettings(
        args.tokens, args.answer_tokens, args.lr, args.minutes, args.steps, args.checkpoint_every, args.seed
    )
    engine = common.load_engine(args, None, model=args.model)
    bar = tqdm(desc="tune", unit="step", total=args.steps)

    def progress(event: dict) -> None:
        if "val_loss" in event:
            bar.write(
                f"step {event['step']}: validation KL {event['val_loss']:.4f} ({event['seconds']:.0f} s)"
            )
        else:
            bar.update(1)
            bar.set_postfix(loss=f"{event['loss']:.4f}")

    result = tune(engine, train, val, args.out, settings, args.resume, progress)
    bar.close()
    report = {
        "data": [str(p) for p in args.data],
        "train_prompts": len(train),
        "val_prompts": len(val),
        "settings": asdict(settings),
        **asdict(result),
    }
    (args.out / "tune.json").write_text(json.dumps(report, indent=2))
    print(
        f"{args.out / ADAPTER_FILE}: validation KL {result.best_val_loss:.4f} "
        f"(chunks precomputed alone: {result.no_adapter_val_loss:.4f}), {result.steps} steps"
    )
