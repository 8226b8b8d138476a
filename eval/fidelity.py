"""Fast fidelity screen: does a blend configuration keep full prefill's greedy answer?

    python -m eval.fidelity --dataset ../shared/data/musique_dev.json --n 30 \\
        --variants "reuse;deviation@0.15;deviation,first_k=4@0.15" --out runs/fidelity.json

Full prefill's greedy answer is computed once per prompt and cached on disk. Each variant is then
scored by *teacher forcing*: one prefill, then one pass over full's answer tokens. Greedy decoding
from the variant's prefill reproduces full's answer exactly when every step's argmax is full's
next token, so ``identical`` here is exact (it is the share of answers a greedy decode would keep
token for token), at the cost of one prefill and one short pass rather than a decode loop. This
is what made it cheap enough to compare many selection strategies on 2 CPU cores; ``eval.quality``
then checks the chosen ones with real decoding.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from blendrag.cli.common import add_device_args
from eval.metrics import kl_divergence
from harness.data import Item, dataset_chunks, load_dataset
from harness.report import settings, write_json
from harness.runner import Backend, load_backend
from harness.stats import summarize
from harness.variants import Variant, parse_variants


@dataclass
class Reference:
    """Full prefill's greedy answer to one prompt."""

    targets: list[int]  # the greedy tokens, ending with the EOS token when it stopped on one
    ended_with_eos: bool
    first_logits: torch.Tensor  # [vocab]
    nll: list[float]  # full's -log p of each target
    first_line_len: int  # targets up to and including the one that ends the answer's first line

    @property
    def answer_ids(self) -> list[int]:
        return self.targets[:-1] if self.ended_with_eos else self.targets


def reference_key(engine: Any, chunks: list[str], question: str, max_new_tokens: int) -> str:
    ids = engine.prompt_format.build(chunks, question).ids
    h = hashlib.sha256(f"{engine.fingerprint}|{max_new_tokens}|".encode())
    h.update(json.dumps(ids).encode())
    return h.hexdigest()[:32]


def first_line_length(engine: Any, token_ids: list[int]) -> int:
    """How many answer tokens make up the first line, the part ``eval.quality`` compares."""
    for i in range(len(token_ids)):
        text = engine.tokenizer.decode(token_ids[: i + 1])
        if text.strip() and "\n" in text.lstrip():
            return i + 1
    return len(token_ids)


@torch.inference_mode()
def compute_reference(engine: Any, chunks: list[str], question: str, max_new_tokens: int) -> Reference:
    pre = engine.prefill(chunks, question, mode="full", max_new_tokens=max_new_tokens)
    logits, targets, nll, eos = pre.logits, [], [], False
    for _ in range(max_new_tokens):
        token = int(logits.argmax())
        targets.append(token)
        nll.append(float(-logits.log_softmax(-1)[token]))
        if token in engine.eos_ids:
            eos = True
            break
        logits = engine.continuation_logits(pre, [token])[0]
    return Reference(targets, eos, pre.logits, nll, first_line_length(engine, targets))


def load_reference(
    cache: Path, engine: Any, chunks: list[str], question: str, max_new_tokens: int
) -> Reference:
    path = cache / f"{reference_key(engine, chunks, question, max_new_tokens)}.pt"
    if path.exists():
        return Reference(**torch.load(path))
    ref = compute_reference(engine, chunks, question, max_new_tokens)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(ref.__dict__, tmp)
    tmp.replace(path)
    return ref


def score_variant(
    backend: Backend, chunks: list[str], question: str, variant: Variant, ref: Reference
) -> dict[str, Any]:
    engine, answer = backend.engine, ref.answer_ids
    config = backend.config_for(variant)
    pre = engine.prefill(chunks, question, mode=variant.mode, config=config, max_new_tokens=len(answer))
    steps = [pre.logits[None]] + ([engine.continuation_logits(pre, answer)] if answer else [])
    logits = torch.cat(steps)[: len(ref.targets)]  # row i predicts target i
    predicted = logits.argmax(-1).tolist()
    agree = [p == t for p, t in zip(predicted, ref.targets, strict=True)]
    if ref.ended_with_eos:  # any end-of-turn token ends the answer the same way
        agree[-1] = predicted[-1] in engine.eos_ids
    first_miss = agree.index(False) if False in agree else len(agree)
    nll = -logits.log_softmax(-1).gather(1, torch.tensor(ref.targets)[:, None]).squeeze(1)
    return {
        "identical": float(first_miss == len(agree)),
        "identical_first_line": float(first_miss >= ref.first_line_len),
        "first_miss": first_miss,  # answer tokens agreed before the first divergence
        "kl_first": kl_divergence(ref.first_logits, pre.logits),
        "delta_nll": float(nll.mean()) - sum(ref.nll) / len(ref.nll),
        "ttft_s": pre.stats.ttft_s,
        "recomputed_frac": pre.stats.n_recomputed / pre.stats.n_tokens,
    }


def evaluate(
    backend: Backend, items: list[Item], variants: list[Variant], top_k: int, max_new_tokens: int, cache: Path
) -> list[dict[str, Any]]:
    source = dataset_chunks(top_k)
    records = []
    for item in tqdm(items, desc="questions", unit="q"):
        chunks = source(item)
        backend.engine.precompute(chunks)
        ref = load_reference(cache, backend.engine, chunks, item["question"], max_new_tokens)
        results = {v.name: score_variant(backend, chunks, item["question"], v, ref) for v in variants}
        answer = backend.engine.tokenizer.decode(ref.answer_ids)
        records.append({"question": item["question"], "full_answer": answer, "results": results})
    return records


def summarize_all(records: list[dict[str, Any]], variants: list[Variant]) -> list[dict[str, Any]]:
    summary = []
    for v in variants:
        rows = [r["results"][v.name] for r in records]
        row: dict[str, Any] = {"name": v.name, "n": len(rows)}
        for key in (
            "identical",
            "identical_first_line",
            "first_miss",
            "kl_first",
            "delta_nll",
            "ttft_s",
            "recomputed_frac",
        ):
            row[key] = summarize([x[key] for x in rows])["mean"]
        summary.append(row)
    return summary


def format_table(summary: list[dict[str, Any]]) -> str:
    width = max(len(r["name"]) for r in summary)
    lines = [f"{'variant':<{width}}  ident  line1  agreed  KL1     dNLL    TTFT s  recomp"]
    for r in summary:
        lines.append(
            f"{r['name']:<{width}}  {r['identical']:.2f}   {r['identical_first_line']:.2f}   "
            f"{r['first_miss']:>6.1f}  "
            f"{r['kl_first']:.4f}  {r['delta_nll']:.4f}  {r['ttft_s']:.2f}    {r['recomputed_frac']:.1%}"
        )
    return "\n".join(lines)


def add_screen_args(p: argparse.ArgumentParser) -> None:
    """The options of every screen built on this one (``eval.rankings`` too): what
    ``load_backend``, ``evaluate`` and ``report`` read."""
    p.add_argument("--dataset", type=Path, required=True)
    p.add_argument("--top-k", type=int, default=6)
    p.add_argument("--kv-store", default=None)
    p.add_argument("--model", default=None)
    add_device_args(p)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--ref-cache", type=Path, default=Path("runs/fidelity-refs"))
    p.add_argument("--out", type=Path, default=None)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m eval.fidelity", description=__doc__.splitlines()[0])
    add_screen_args(p)
    p.add_argument("--n", type=int, default=None)
    p.add_argument("--skip", type=int, default=0, help="start at question SKIP")
    p.add_argument("--variants", required=True, help='";"-separated: reuse, prefix, or SPEC@RATIO')
    p.add_argument("--chunk-context", default="none", choices=["none", "prefix"])
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        variants = parse_variants(args.variants)
        items = load_dataset(args.dataset, None)[args.skip : args.skip + args.n if args.n else None]
    except (ValueError, OSError) as err:
        raise SystemExit(f"error: {err}") from None
    backend = load_backend(args.model, args.kv_store, args.chunk_context, args.device, args.dtype)
    start = time.perf_counter()
    records = evaluate(backend, items, variants, args.top_k, args.max_new_tokens, args.ref_cache)
    summary = summarize_all(records, variants)
    report(args, summary, records)
    print(f"({len(items)} questions, {time.perf_counter() - start:.0f} s)")
    return 0


def report(args: argparse.Namespace, summary: list[dict[str, Any]], records: list[dict[str, Any]]) -> None:
    """Write settings, summary and per-question records to ``args.out`` when given; print the table."""
    if args.out:
        write_json(args.out, {"settings": settings(args), "summary": summary, "records": records})
    print(format_table(summary))


if __name__ == "__main__":
    raise SystemExit(main())
