"""Roofline MODEL (not a measurement) of prefill TTFT for full / reuse / blend on an H100 SXM,
the Llama-3-8B shape in bf16: the arithmetic behind docs/gpu-roofline.md.

    python -m bench.roofline [--check-layer 1] [--pcie-gbs 64]

Each phase takes max(FLOPs / peak FLOP/s, bytes / peak bandwidth): a lower bound that assumes
every kernel runs at the published peak. Phases, per prompt of N chunk tokens + Q question tokens:

- all-token: layers ``0..c-1`` on every token, plus the check layer's Q/K/V projections (blend);
  every layer for full; nothing for reuse.
- recompute: the linear layers on the tokens that go on (blend: r*N + Q from the check layer
  on; reuse: the Q question tokens in every layer).
- attention: causal over T = N + Q for the all-token layers, the selected queries over all T
  keys (causal by position: on average half of them) for the others.
- KV load: chunk KV into the request's buffer, (a) from HBM (copy + RoPE re-alignment of K) or
  (b) over PCIe from pinned host memory; (b) is pipelined layer by layer with compute, so its
  TTFT is max(load, compute) plus one layer's load.
- logits: the LM head for the last token.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

# NVIDIA H100 Tensor Core GPU datasheet, SXM5: BF16 Tensor Core 1,979 TFLOPS *with sparsity*
# (989 dense), HBM3 3.35 TB/s, PCIe Gen5 128 GB/s (both directions together: 64 GB/s host->device).
PEAK_TFLOPS = 989.0
HBM_GBS = 3350.0
PCIE_GBS = 64.0


@dataclass(frozen=True)
class Shape:
    n_layers: int = 32
    dim: int = 4096
    n_heads: int = 32
    n_kv_heads: int = 8
    head_dim: int = 128
    intermediate: int = 14336
    vocab: int = 128256
    elt: int = 2  # bf16

    @property
    def qkv_params(self) -> int:
        return self.dim * (self.n_heads + 2 * self.n_kv_heads) * self.head_dim

    @property
    def layer_params(self) -> int:
        return self.qkv_params + self.n_heads * self.head_dim * self.dim + 3 * self.dim * self.intermediate

    @property
    def kv_bytes_per_token_layer(self) -> int:
        return 2 * self.n_kv_heads * self.head_dim * self.elt


@dataclass
class Phase:
    flops: float = 0.0
    bytes: float = 0.0

    def add(self, flops: float, nbytes: float) -> None:
        self.flops += flops
        self.bytes += nbytes

    def ms(self, bandwidth_gbs: float = HBM_GBS, peak_tflops: float = PEAK_TFLOPS) -> float:
        return 1e3 * max(self.flops / (peak_tflops * 1e12), self.bytes / (bandwidth_gbs * 1e9))


def linear(s: Shape, phase: Phase, tokens: int, params: int) -> None:
    """``tokens`` rows through ``params`` weights: 2 FLOPs per weight per row, weights read once."""
    phase.add(2.0 * params * tokens, params * s.elt)


def attention(s: Shape, phase: Phase, queries: int, keys: int, visible: float) -> None:
    """``queries`` over ``keys`` where each query sees ``visible`` keys on average; Q/K/V/O read once."""
    phase.add(
        4.0 * s.n_heads * s.head_dim * queries * visible,
        keys * s.kv_bytes_per_token_layer + 2 * queries * s.n_heads * s.head_dim * s.elt,
    )


def model(
    s: Shape,
    n_chunk: int,
    q: int,
    mode: str,
    ratio: float,
    check: int,
    pcie_gbs: float = PCIE_GBS,
    hbm_gbs: float = HBM_GBS,
    peak_tflops: float = PEAK_TFLOPS,
) -> dict[str, float]:
    """The phases' times and both TTFTs in ms; the ceilings default to the H100 datasheet's
    (bench.gpu_check passes the ones it measured)."""
    t, big_l = n_chunk + q, s.n_layers
    # Attention split in two: within each, every layer has the same shape, so max() of the sums
    # is the sum of the per-layer max()es.
    all_tok, recompute, attn_all, attn_sel = Phase(), Phase(), Phase(), Phase()
    if mode == "full":
        linear(s, all_tok, t, s.layer_params * big_l)
        for _ in range(big_l):
            attention(s, attn_all, t, t, t / 2)
    elif mode == "reuse":
        linear(s, recompute, q, s.layer_params * big_l)
        for _ in range(big_l):
            attention(s, attn_sel, q, t, t)
    else:
        sel = round(ratio * n_chunk) + q
        linear(s, all_tok, t, s.layer_params * check + s.qkv_params)
        linear(s, recompute, sel, s.layer_params * (big_l - check) - s.qkv_params)
        for layer in range(big_l):
            if layer < check:
                attention(s, attn_all, t, t, t / 2)
            else:
                attention(s, attn_sel, sel, t, n_chunk / 2 + q)
    kv_chunk_bytes = n_chunk * s.kv_bytes_per_token_layer * big_l
    load_hbm = Phase(0.0, 2 * kv_chunk_bytes + kv_chunk_bytes)  # copy (read + write) + realign K (r + w)
    load_pcie = Phase(0.0, kv_chunk_bytes)
    logits = Phase()
    linear(s, logits, 1, s.vocab * s.dim)

    def ms(phase: Phase, bandwidth_gbs: float = hbm_gbs) -> float:
        return phase.ms(bandwidth_gbs, peak_tflops)

    attn_ms = ms(attn_all) + ms(attn_sel)
    compute = ms(all_tok) + ms(recompute) + attn_ms + ms(logits)
    reused = mode != "full"
    hbm_ms = ms(load_hbm) if reused else 0.0
    pcie_ms = ms(load_pcie, pcie_gbs) if reused else 0.0
    return {
        "all_token_ms": ms(all_tok),
        "recompute_ms": ms(recompute),
        "attention_ms": attn_ms,
        "logits_ms": ms(logits),
        "kv_hbm_ms": hbm_ms,
        "kv_pcie_ms": pcie_ms,
        "ttft_gpu_kv_ms": compute + hbm_ms,
        "ttft_pinned_kv_ms": max(compute, pcie_ms) + pcie_ms / big_l if reused else compute,
    }


def table(chunks: list[int], chunk_tokens: int, q: int, ratios: list[float], check: int, pcie: float) -> str:
    s = Shape()
    head = (
        "| chunks | method | all-token | recompute | attention | KV load HBM | KV load PCIe "
        "| TTFT, KV in GPU | TTFT, KV pinned host | speedup vs full (GPU / pinned) |"
    )
    lines = [head, "|" + " ---: |" * 10]
    for n in chunks:
        full = model(s, n * chunk_tokens, q, "full", 0.0, check, pcie)
        for mode, ratio in [("full", None), ("reuse", None), *(("blend", r) for r in ratios)]:
            m = model(s, n * chunk_tokens, q, mode, ratio or 0.0, check, pcie)
            name = mode if ratio is None else f"blend r={ratio:g}"
            lines.append(
                f"| {n} | {name} | {m['all_token_ms']:.2f} | {m['recompute_ms']:.2f} "
                f"| {m['attention_ms']:.2f} | {m['kv_hbm_ms']:.2f} | {m['kv_pcie_ms']:.2f} "
                f"| {m['ttft_gpu_kv_ms']:.2f} "
                f"| {m['ttft_pinned_kv_ms']:.2f} | {full['ttft_gpu_kv_ms'] / m['ttft_gpu_kv_ms']:.1f}x / "
                f"{full['ttft_gpu_kv_ms'] / m['ttft_pinned_kv_ms']:.1f}x |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.roofline", description=__doc__.splitlines()[0])
    p.add_argument("--chunks", default="6,12,24")
    p.add_argument("--chunk-tokens", type=int, default=512)
    p.add_argument("--question-tokens", type=int, default=32)
    p.add_argument("--ratios", default="0.05,0.15,0.3")
    p.add_argument("--check-layer", type=int, default=1)
    p.add_argument("--pcie-gbs", type=float, default=PCIE_GBS, help="host->device bandwidth, GB/s")
    args = p.parse_args(argv)
    chunks = [int(x) for x in args.chunks.split(",")]
    ratios = [float(x) for x in args.ratios.split(",")]
    print(f"MODEL, not a measurement: H100 SXM at peak ({PEAK_TFLOPS:g} TFLOP/s bf16 dense, ", end="")
    print(f"{HBM_GBS:g} GB/s HBM3, {args.pcie_gbs:g} GB/s PCIe), Llama-3-8B shape, times in ms")
    print(table(chunks, args.chunk_tokens, args.question_tokens, ratios, args.check_layer, args.pcie_gbs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
