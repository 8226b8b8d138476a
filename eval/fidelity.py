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

from blendrag.adapter import ReuseAdapter
from blendrag.cli.common import add_device_args
from eval.metrics import kl_divergence
from eval.noise_floor import FLOORS, Floor, Prefilled
from harness.answers import best_f1, clean_answer
from harness.data import Item, dataset_chunks, load_dataset
from harness.report import settings, write_json
from harness.runner import Backend, load_backend
from harness.stats import bootstrap_ci, summarize
from harness.variants import Variant, name_list, parse_variants


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
    targets, logits = engine.greedy_answer(pre, max_new_tokens)
    nll = [float(-row.log_softmax(-1)[token]) for row, token in zip(logits, targets, strict=True)]
    eos = targets[-1] in engine.eos_ids
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
    backend: Backend,
    chunks: list[str],
    question: str,
    variant: Variant,
    ref: Reference,
    golds: Sequence[str] = (),
    max_new_tokens: int = 0,
    scores: torch.Tensor | None = None,
) -> dict[str, Any]:
    """``score`` of one variant's prefill (with ``golds``, its greedy answer's F1 too; with
    ``scores``, blend's chunk tokens ranked by them: ``BlendEngine.prefill``)."""
    engine = backend.engine
    config = backend.config_for(variant)
    room = max(len(ref.answer_ids), max_new_tokens)
    pre = engine.prefill(
        chunks, question, mode=variant.mode, config=config, max_new_tokens=room, scores=scores
    )
    run = Prefilled(
        pre.logits,
        pre.kv,
        pre.stats.n_tokens,
        pre.stats.ttft_s,
        lambda ids: engine.continuation_logits(pre, ids),
        pre.stats.n_recomputed / pre.stats.n_tokens,
    )
    return score(engine, run, ref, golds, max_new_tokens)


def score_floor(
    floor: Floor, chunks: list[str], question: str, ref: Reference, golds: Sequence[str], max_new_tokens: int
) -> dict[str, Any]:
    run = floor.prefill(chunks, question, max(len(ref.answer_ids), max_new_tokens))
    return score(floor.engine, run, ref, golds, max_new_tokens)


def greedy_answer(engine: Any, run: Prefilled, max_new_tokens: int) -> list[int]:
    """Greedy decoding from ``run``, then ``run``'s KV rewound to the prompt (slot i holds
    position i, so the next tokens appended overwrite the answer's)."""
    logits, tokens = run.logits, []
    for _ in range(max_new_tokens):
        token = int(logits.argmax())
        if token in engine.eos_ids:
            break
        tokens.append(token)
        logits = run.extend([token])[0]
    run.kv.length = run.n_prompt
    return tokens


def gold_f1(engine: Any, token_ids: list[int], golds: Sequence[str]) -> float:
    return best_f1(clean_answer(engine.tokenizer.decode(token_ids)), golds)


def score(
    engine: Any, run: Prefilled, ref: Reference, golds: Sequence[str] = (), max_new_tokens: int = 0
) -> dict[str, Any]:
    """Teacher forcing of full's answer after ``run``'s prompt: agreement, KL and dNLL; with
    ``golds``, the F1 of ``run``'s own greedy answer (decoded first) against them."""
    out = {}
    if golds:
        out["f1_gold"] = gold_f1(engine, greedy_answer(engine, run, max_new_tokens), golds)
    answer = ref.answer_ids
    steps = [run.logits[None]] + ([run.extend(answer)] if answer else [])
    logits = torch.cat(steps)[: len(ref.targets)]  # row i predicts target i
    predicted = logits.argmax(-1).tolist()
    agree = [p == t for p, t in zip(predicted, ref.targets, strict=True)]
    if ref.ended_with_eos:  # any end-of-turn token ends the answer the same way
        agree[-1] = predicted[-1] in engine.eos_ids
    first_miss = agree.index(False) if False in agree else len(agree)
    nll = -logits.log_softmax(-1).gather(1, torch.tensor(ref.targets)[:, None]).squeeze(1)
    return out | {
        "identical": float(first_miss == len(agree)),
        "identical_first_line": float(first_miss >= ref.first_line_len),
        "first_miss": first_miss,  # answer tokens agreed before the first divergence
        "agreed_share": sum(agree) / len(agree),  # answer tokens whose argmax is full's
        "kl_first": kl_divergence(ref.first_logits, run.logits),
        "delta_nll": float(nll.mean()) - sum(ref.nll) / len(ref.nll),
        "ttft_s": run.ttft_s,
        "recomputed_frac": run.recomputed_frac,
    }


def evaluate(
    backend: Backend,
    items: list[Item],
    variants: list[Variant],
    top_k: int,
    max_new_tokens: int,
    cache: Path,
    floors: Sequence[str] = (),
    with_gold: bool = False,
    adapted: Backend | None = None,
) -> list[dict[str, Any]]:
    """Each item's record: full's answer and every variant's and noise floor's scores (with
    ``with_gold``, gold F1 of every greedy answer, full's included; with ``adapted``, a backend
    whose engine has a reuse adapter, every variant but full scored on it too, as
    ``SPEC+adapter@RATIO``)."""
    source = dataset_chunks(top_k)
    engine = backend.engine
    floor_runs = [Floor(engine, name) for name in floors]
    runs = scored_runs(backend, variants, adapted)
    records = []
    for item in tqdm(items, desc="questions", unit="q"):
        chunks, question = source(item), item["question"]
        golds = item["answers"] if with_gold else ()
        for b in [backend] if adapted is None else [backend, adapted]:
            b.engine.precompute(chunks)
        ref = load_reference(cache, engine, chunks, question, max_new_tokens)
        results = {
            name: score_variant(b, chunks, question, v, ref, golds, max_new_tokens) for b, v, name in runs
        }
        results |= {
            f: score_floor(r, chunks, question, ref, golds, max_new_tokens)
            for f, r in zip(floors, floor_runs, strict=True)
        }
        record = {
            "question": question,
            "full_answer": engine.tokenizer.decode(ref.answer_ids),
            "results": results,
        }
        if golds:
            record["full_f1_gold"] = gold_f1(engine, ref.answer_ids, golds)
        records.append(record)
    return records


def scored_runs(
    backend: Backend, variants: Sequence[Variant], adapted: Backend | None
) -> list[tuple[Backend, Variant, str]]:
    """(backend, variant, name in the results) of everything ``evaluate`` scores, floors aside:
    every variant, then with ``adapted`` every variant but full again on it."""
    runs = [(backend, v, v.name) for v in variants]
    if adapted is not None:
        runs += [(adapted, v, adapted_name(v)) for v in variants if v.mode != "full"]
    return runs


def adapted_name(variant: Variant) -> str:
    """``SPEC+adapter@RATIO`` (``reuse+adapter``): the ratio stays last, where ``eval.frontier``
    reads it."""
    spec, at, ratio = variant.name.rpartition("@")
    return f"{spec}+adapter@{ratio}" if at else f"{variant.name}+adapter"


METRICS = (
    "identical",
    "identical_first_line",
    "first_miss",
    "agreed_share",
    "kl_first",
    "delta_nll",
    "f1_gold",
    "ttft_s",
    "recomputed_frac",
)


def summarize_all(records: list[dict[str, Any]], names: Sequence[str]) -> list[dict[str, Any]]:
    """Per variant (or floor) name: the mean of every metric and its bootstrap 95 % interval
    (``<metric>_ci``)."""
    summary = []
    for name in names:
        rows = [r["results"][name] for r in records]
        row: dict[str, Any] = {"name": name, "n": len(rows)}
        for key in METRICS:
            values = [x[key] for x in rows if key in x]
            if values:
                row[key] = summarize(values)["mean"]
                row[f"{key}_ci"] = list(bootstrap_ci(values))
        summary.append(row)
    return summary


def format_table(summary: list[dict[str, Any]]) -> str:
    """One line per variant: means, with the 95 % interval of the first-token KL and of the share
    of answer tokens agreed (gold F1 where it was measured)."""
    width = max(len(r["name"]) for r in summary)
    lines = [
        f"{'variant':<{width}}  ident  line1  agreed  agree%  {'KL1 [95% CI]':<24}  {'agree% CI':<11}"
        "  dNLL    F1gold  TTFT s  recomp"
    ]
    for r in summary:
        kl_lo, kl_hi = r["kl_first_ci"]
        ag_lo, ag_hi = r["agreed_share_ci"]
        f1 = f"{r['f1_gold']:.3f}" if "f1_gold" in r else "  -  "
        lines.append(
            f"{r['name']:<{width}}  {r['identical']:.2f}   {r['identical_first_line']:.2f}   "
            f"{r['first_miss']:>6.1f}  {r['agreed_share']:>5.1%}  "
            f"{r['kl_first']:.4f} [{kl_lo:.4f}, {kl_hi:.4f}]  {f'{ag_lo:.0%}-{ag_hi:.0%}':<11}  "
            f"{r['delta_nll']:.4f}  {f1}   {r['ttft_s']:.2f}    {r['recomputed_frac']:.1%}"
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
    p.add_argument("--variants", default="", help='";"-separated: full (timed), reuse, prefix, or SPEC@RATIO')
    p.add_argument(
        "--floors",
        default="",
        help=f"comma-separated noise-floor rows (full prefill with lossy KV or weights): {', '.join(FLOORS)}",
    )
    p.add_argument("--gold", action="store_true", help="also decode every variant greedily for gold F1")
    p.add_argument("--chunk-context", default="none", choices=["none", "prefix"])
    p.add_argument(
        "--adapter",
        type=Path,
        default=None,
        help="a reuse adapter from `blendrag tune`: every variant but full is also scored over chunk KV "
        "computed after it (SPEC+adapter@RATIO), beside the same variant without",
    )
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        variants = parse_variants(args.variants)
        floors = name_list(args.floors)
        unknown = set(floors) - set(FLOORS)
        if unknown:
            raise ValueError(f"unknown noise floor(s) {sorted(unknown)}; choose from {', '.join(FLOORS)}")
        items = load_dataset(args.dataset, None)[args.skip : args.skip + args.n if args.n else None]
    except (ValueError, OSError) as err:
        raise SystemExit(f"error: {err}") from None
    backend = load_backend(args.model, args.kv_store, args.chunk_context, args.device, args.dtype)
    adapted = None
    if args.adapter:
        adapted = Backend(backend.engine.with_adapter(ReuseAdapter.load(args.adapter)), backend.base_config)
    names = [name for _, _, name in scored_runs(backend, variants, adapted)]
    start = time.perf_counter()
    records = evaluate(
        backend, items, variants, args.top_k, args.max_new_tokens, args.ref_cache, floors, args.gold, adapted
    )
    summary = summarize_all(records, names + floors)
    report(args, summary, records)
    print(f"({len(items)} questions, {time.perf_counter() - start:.0f} s)")
    return 0


def report(args: argparse.Namespace, summary: list[dict[str, Any]], records: list[dict[str, Any]]) -> None:
    """Write settings, summary and per-question records to ``args.out`` when given; print the table
    (and full prefill's own gold F1, when measured)."""
    if args.out:
        write_json(args.out, {"settings": settings(args), "summary": summary, "records": records})
    print_summary(summary, records)


def print_summary(summary: list[dict[str, Any]], records: list[dict[str, Any]]) -> None:
    """The table, and full prefill's own gold F1 when it was measured."""
    print(format_table(summary))
    full_f1 = [r["full_f1_gold"] for r in records if "full_f1_gold" in r]
    if full_f1:
        lo, hi = bootstrap_ci(full_f1)
        print(f"full prefill's gold F1: {summarize(full_f1)['mean']:.3f} [{lo:.3f}, {hi:.3f}]")


if __name__ == "__main__":
    raise SystemExit(main())
