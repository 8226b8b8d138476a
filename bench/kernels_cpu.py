"""CPU timings behind ``kernels.selective_mask``'s choice: SDPA with a boolean mask vs compiled
FlexAttention with a block mask, for one layer's selective attention.

    python -m bench.kernels_cpu [--n 560] [--length 3700] [--heads 9] [--kv-heads 3] [--head-dim 64]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from blendrag.kernels import flex, reference
from harness.timing import time_ms


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    return statistics.median(time_ms(fn, 0, repeats))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.kernels_cpu", description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=560)
    parser.add_argument("--length", type=int, default=3700)
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    t, r = args.length, args.repeats
    # Recomputed chunk tokens anywhere in the context, the question at the end.
    positions = torch.randperm(t - 1)[: args.n - 1].sort().values
    positions = torch.cat([positions, torch.tensor([t - 1])])
    q = torch.randn(args.heads, args.n, args.head_dim)
    keys, values = (torch.randn(args.kv_heads, t, args.head_dim) for _ in range(2))

    bool_mask = reference.causal_by_position(positions, t)
    block_mask = flex.block_mask(positions, t)
    start = time.perf_counter()
    flex.selective_attention(q, keys, values, block_mask)
    compile_s = time.perf_counter() - start

    shape = f"n={args.n} T={t} H={args.heads} Hkv={args.kv_heads} D={args.head_dim}"
    print(f"{shape} fp32, {torch.get_num_threads()} threads, median of {r}")
    print(f"  bool mask build     {median_ms(lambda: reference.causal_by_position(positions, t), r):8.2f} ms")
    print(f"  block mask build    {median_ms(lambda: flex.block_mask(positions, t), r):8.2f} ms")
    print(f"  flex first call     {1e3 * compile_s:8.0f} ms (compile)")
    sdpa = median_ms(lambda: reference.selective_attention(q, keys, values, bool_mask), r)
    flex_ms = median_ms(lambda: flex.selective_attention(q, keys, values, block_mask), r)
    print(f"  SDPA + bool mask    {sdpa:8.2f} ms")
    print(f"  Flex + block mask   {flex_ms:8.2f} ms")


if __name__ == "__main__":
    main()
