"""Where reused chunk KV deviates from full prefill, layer by layer.

    python -m eval.deviation --dataset ../shared/data/musique_dev.json --n 2

For each question: full prefill and reuse (every chunk's KV as precomputed, nothing recomputed)
of the same prompt, then per layer, over the chunk tokens: the relative error of the reused V,
the share of that error held by the worst ``--ratio`` of tokens (is it sparse enough for a few
recomputed tokens to fix?), and how many of those worst tokens are also the worst at layer 1
(can a layer-1 score, CacheBlend's, find them?). Then, for offset correction (``blendrag.offset``),
the share of each chunk's K and V residual (full minus reused, keys un-rotated) that the chunk's
mean residual explains, per layer: what a perfectly estimated offset would remove.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch

from blendrag.rope import unrotate
from harness.data import load_prompts
from harness.runner import load_backend


def layer_report(full_v: torch.Tensor, reuse_v: torch.Tensor, ratio: float) -> list[dict[str, float]]:
    """``*_v``: ``[n_layers, n_kv_heads, n_chunk_tokens, head_dim]``; one row per layer."""
    err = (full_v - reuse_v).pow(2).sum(dim=(1, 3))  # [layers, tokens]
    k = max(1, round(ratio * err.shape[1]))
    worst_at_1 = set(err[min(1, len(err) - 1)].topk(k).indices.tolist())
    rows = []
    for layer, e in enumerate(err):
        worst = e.topk(k)
        rows.append(
            {
                "layer": layer,
                "relative_error": float((e.sum() / full_v[layer].pow(2).sum()).sqrt()),
                "worst_share": float(worst.values.sum() / e.sum()),
                "overlap_with_layer_1": len(worst_at_1 & set(worst.indices.tolist())) / k,
            }
        )
    return rows


def mean_share(full: torch.Tensor, reuse: torch.Tensor, spans: list[tuple[int, int]]) -> torch.Tensor:
    """``[n_layers]``: the share of the chunk residual ``full - reuse`` (``[n_layers, n_kv_heads,
    positions, head_dim]``) that each chunk's mean residual per layer and KV head explains. A
    chunk's first token is left out, as offset correction leaves it out."""
    total = explained = torch.zeros(full.shape[0], dtype=torch.float64)
    for start, length in spans:
        residual = (full - reuse)[:, :, start + 1 : start + length].double()
        mean = residual.mean(dim=2, keepdim=True)
        total = total + residual.pow(2).sum(dim=(1, 2, 3))
        explained = explained + mean.pow(2).sum(dim=(1, 2, 3)) * residual.shape[2]
    return explained / total


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval.deviation", description=__doc__.splitlines()[0])
    p.add_argument("--dataset", type=Path, required=True)
    p.add_argument("--n", type=int, default=2)
    p.add_argument("--top-k", type=int, default=6)
    p.add_argument("--ratio", type=float, default=0.15)
    p.add_argument("--chunk-context", default="none", choices=["none", "prefix"])
    args = p.parse_args(argv)
    engine = load_backend(None, "memory", args.chunk_context).engine
    for chunks, question in load_prompts(args.dataset, args.n, args.top_k):
        full = engine.prefill(chunks, question, mode="full")
        reuse = engine.prefill(chunks, question, mode="reuse")
        lo, hi = len(full.prompt.prefix), full.prompt.suffix_start
        rows = layer_report(full.kv.v[:, :, lo:hi], reuse.kv.v[:, :, lo:hi], args.ratio)
        n = full.prompt.suffix_start
        cos, sin = engine.rotary.cos_sin(torch.arange(n), torch.float32)
        keys = [
            unrotate(pre.kv.k[:, :, :n].float(), cos, sin, engine.rotary.scaling) for pre in (full, reuse)
        ]
        spans = [(o, len(c)) for o, c in zip(full.prompt.chunk_offsets(), full.prompt.chunks, strict=True)]
        k_share = mean_share(*keys, spans)
        v_share = mean_share(full.kv.v[:, :, :n], reuse.kv.v[:, :, :n], spans)
        print(f"{question}  ({hi - lo} chunk tokens)")
        worst = f"worst {args.ratio:.0%} share"
        print(
            f"{'layer':>5}  {'rel. V error':>12}  {worst:>17}  {'overlap L1':>10}  K mean share  V mean share"
        )
        for r, ks, vs in zip(rows, k_share.tolist(), v_share.tolist(), strict=True):
            print(
                f"{r['layer']:>5}  {r['relative_error']:>12.3f}  {r['worst_share']:>17.2f}"
                f"  {r['overlap_with_layer_1']:>10.2f}  {ks:>12.2f}  {vs:>12.2f}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
