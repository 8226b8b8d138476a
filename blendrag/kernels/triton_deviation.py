"""CacheBlend's KV deviation, fused: the cached V rows are gathered from the buffer inside the
kernel and reduced over heads and head dim, so nothing ``[Hkv, n, D]``-sized is materialised."""

from __future__ import annotations

import torch

from ._triton import tl, triton

BLOCK_N = 32


@triton.jit
def _kv_deviation_kernel(
    fresh_ptr,
    layer_ptr,
    pos_ptr,
    out_ptr,
    n,
    n_heads,
    fresh_stride_head,
    fresh_stride_row,
    layer_stride_head,
    layer_stride_pos,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    pos = tl.load(pos_ptr + rows, mask=rows < n, other=0)
    mask = (rows < n)[:, None] & (cols < HEAD_DIM)[None, :]
    fresh_ptrs = fresh_ptr + rows[:, None] * fresh_stride_row + cols[None, :]
    old_ptrs = layer_ptr + pos[:, None] * layer_stride_pos + cols[None, :]

    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for h in range(n_heads):
        fresh = tl.load(fresh_ptrs + h * fresh_stride_head, mask=mask, other=0.0).to(tl.float32)
        old = tl.load(old_ptrs + h * layer_stride_head, mask=mask, other=0.0).to(tl.float32)
        diff = fresh - old
        acc += tl.sum(diff * diff, axis=1)
    tl.store(out_ptr + rows, acc, mask=rows < n)


def kv_deviation(v_fresh: torch.Tensor, v_layer: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    n_heads, n, head_dim = v_fresh.shape
    out = torch.empty(n, dtype=torch.float32, device=v_fresh.device)
    _kv_deviation_kernel[(triton.cdiv(n, BLOCK_N),)](
        v_fresh,
        v_layer,
        positions,
        out,
        n,
        n_heads,
        v_fresh.stride(0),
        v_fresh.stride(1),
        v_layer.stride(0),
        v_layer.stride(1),
        HEAD_DIM=head_dim,
        BLOCK_N=BLOCK_N,
        BLOCK_D=triton.next_power_of_2(head_dim),
    )
    return out
