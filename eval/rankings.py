"""How good can a token selection be? Blend with rankings that a real query cannot compute.

    python -m eval.rankings --dataset ../shared/data/musique_dev.json --n 20 --ratios 0.15 \\
        --kv-store runs/kv-none --out runs/rankings.json

Each ranking replaces the preview's scores (which chunk tokens blend recomputes) in an otherwise
default blend, and is scored with the fidelity screen (``eval.fidelity``: teacher forcing against
full prefill's greedy answer). The oracle rankings read full prefill's KV of the same prompt, which
a query never has: they bound what a selection of that size can reach.

    preview              the default: the question's attention over the reused KV, all layers
    preview_first_half   the same, summed over the first half of the layers only
    preview_second_half  the same, summed over the second half only
    oracle_error         each token's K/V error against full prefill (each layer normalised)
    oracle_attention     the question's attention in full prefill, all layers
    oracle_weighted      full prefill's attention times the token's V error, layer by layer
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from blendrag.forward import LayerView, run_layers
from blendrag.kvbuffer import KVBuffer
from blendrag.selection import question_attention
from eval.fidelity import add_screen_args, load_reference, report, score_variant, summarize_all
from harness.data import Item, dataset_chunks, load_dataset
from harness.runner import Backend, load_backend
from harness.variants import Variant, float_list

Ranking = Callable[[dict[str, torch.Tensor]], torch.Tensor]


def _share_per_layer(x: torch.Tensor) -> torch.Tensor:
    """``[layers, positions]`` -> each layer's row divided by its sum (every layer counts alike)."""
    return x / x.sum(dim=1, keepdim=True).clamp_min(1e-12)


def _half(x: torch.Tensor, second: bool) -> torch.Tensor:
    mid = x.shape[0] // 2
    return (x[mid:] if second else x[:mid]).sum(0)


RANKINGS: dict[str, Ranking] = {
    "preview": lambda m: m["reuse_attention"].sum(0),
    "preview_first_half": lambda m: _half(m["reuse_attention"], second=False),
    "preview_second_half": lambda m: _half(m["reuse_attention"], second=True),
    "oracle_error": lambda m: _share_per_layer(m["kv_error"]).sum(0),
    "oracle_attention": lambda m: m["full_attention"].sum(0),
    "oracle_weighted": lambda m: (m["full_attention"] * _share_per_layer(m["v_error"].sqrt())).sum(0),
}


def layer_attention(engine: Any, kv: KVBuffer, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``[layers, kv.length]``: the attention the question's rows (``ids`` at ``positions``) pay
    each position of ``kv`` at every layer, as the preview computes it, one row per layer."""
    rows: list[torch.Tensor] = []

    def observe(view: LayerView) -> torch.Tensor:
        active = torch.arange(view.positions.numel())
        rows.append(question_attention(view, active))
        return active

    observers = dict.fromkeys(range(engine.model.args.n_layers), observe)
    run_layers(engine.model, engine.rotary, kv, ids, positions, observers)
    return torch.stack(rows)


@torch.inference_mode()
def measurements(engine: Any, chunks: list[str], question: str) -> dict[str, torch.Tensor]:
    """What the rankings are built from, each ``[layers, prompt positions]``."""
    full = engine.prefill(chunks, question, mode="full")
    reuse = engine.prefill(chunks, question, mode="reuse")
    prompt, n = full.prompt, len(full.prompt.ids)
    ids, positions = torch.tensor(prompt.suffix), torch.arange(prompt.suffix_start, n)
    v_error = (full.kv.v[:, :, :n] - reuse.kv.v[:, :, :n]).pow(2).sum(dim=(1, 3))
    k_error = (full.kv.k[:, :, :n] - reuse.kv.k[:, :, :n]).pow(2).sum(dim=(1, 3))
    return {
        # The question's rows are recomputed over the KV each buffer already holds for them.
        "reuse_attention": layer_attention(engine, reuse.kv, ids, positions),
        "full_attention": layer_attention(engine, full.kv, ids, positions),
        "v_error": v_error,
        "kv_error": k_error + v_error,
    }


def score_ranking(
    backend: Backend,
    chunks: list[str],
    question: str,
    scores: torch.Tensor,
    ratio: float,
    name: str,
    ref: Any,
) -> dict[str, Any]:
    """One blend whose preview scores are ``scores``: the engine's own selection path then keeps
    the question and the top ``ratio`` of chunk tokens by them."""
    variant = Variant(f"{name}@{ratio:g}", "blend", ratio, "preview")
    return score_variant(backend, chunks, question, variant, ref, scores=scores)


def evaluate(
    backend: Backend,
    items: list[Item],
    rankings: Sequence[str],
    ratios: Sequence[float],
    top_k: int,
    max_new_tokens: int,
    cache: Path,
) -> list[dict[str, Any]]:
    source, engine, records = dataset_chunks(top_k), backend.engine, []
    for item in tqdm(items, desc="questions", unit="q"):
        chunks, question = source(item), item["question"]
        engine.precompute(chunks)
        ref = load_reference(cache, engine, chunks, question, max_new_tokens)
        measured = measurements(engine, chunks, question)
        results = {}
        for name in rankings:
            scores = RANKINGS[name](measured)
            for ratio in ratios:
                result = score_ranking(backend, chunks, question, scores, ratio, name, ref)
                results[f"{name}@{ratio:g}"] = result
        records.append({"question": question, "results": results})
    return records


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m eval.rankings", description=__doc__.splitlines()[0])
    add_screen_args(p)
    p.add_argument("--n", type=int, default=20)
    p.add_argument("--ratios", type=float_list, default=[0.15])
    p.add_argument(
        "--rankings", default=",".join(RANKINGS), help=f"comma-separated, of {', '.join(RANKINGS)}"
    )
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    rankings = [r.strip() for r in args.rankings.split(",") if r.strip()]
    unknown = sorted(set(rankings) - set(RANKINGS))
    if unknown:
        raise SystemExit(f"error: unknown ranking(s) {', '.join(unknown)}; known: {', '.join(RANKINGS)}")
    try:
        items = load_dataset(args.dataset, args.n)
    except (ValueError, OSError) as err:
        raise SystemExit(f"error: {err}") from None
    backend = load_backend(args.model, args.kv_store, device=args.device, dtype=args.dtype)
    records = evaluate(backend, items, rankings, args.ratios, args.top_k, args.max_new_tokens, args.ref_cache)
    variants = [Variant(name, "blend") for name in records[0]["results"]] if records else []
    summary = summarize_all(records, [v.name for v in variants])
    report(args, summary, records)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
