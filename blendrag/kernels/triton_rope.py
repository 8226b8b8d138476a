"""RoPE re-alignment of reused chunk keys: one launch rotates every layer, head and segment."""

from __future__ import annotations

import torch

from ._triton import tl, triton

BLOCK_N = 32


@triton.jit
def _rope_realign_kernel(
    k_ptr,
    pos_ptr,
    cos_ptr,
    sin_ptr,
    n,
    stride_head,  # between (layer, kv head) planes of the flattened buffer
    stride_pos,
    stride_table,
    HALF: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    # Program (i, j): BLOCK_N positions of plane j = layer * n_kv_heads + head.
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_HALF)
    pos = tl.load(pos_ptr + rows, mask=rows < n, other=0)
    mask = (rows < n)[:, None] & (cols < HALF)[None, :]

    x_ptrs = k_ptr + tl.program_id(1).to(tl.int64) * stride_head + pos[:, None] * stride_pos + cols[None, :]
    t_off = pos[:, None] * stride_table + cols[None, :]
    x1 = tl.load(x_ptrs, mask=mask).to(tl.float32)
    x2 = tl.load(x_ptrs + HALF, mask=mask).to(tl.float32)
    # Both halves of the tables are read, so any [T, D] table works, not only duplicated ones.
    cos1 = tl.load(cos_ptr + t_off, mask=mask).to(tl.float32)
    cos2 = tl.load(cos_ptr + t_off + HALF, mask=mask).to(tl.float32)
    sin1 = tl.load(sin_ptr + t_off, mask=mask).to(tl.float32)
    sin2 = tl.load(sin_ptr + t_off + HALF, mask=mask).to(tl.float32)

    # rotate(): x * cos + cat(-x2, x1) * sin, computed in fp32.
    out_ty = k_ptr.dtype.element_ty
    tl.store(x_ptrs, (x1 * cos1 - x2 * sin1).to(out_ty), mask=mask)
    tl.store(x_ptrs + HALF, (x2 * cos2 + x1 * sin2).to(out_ty), mask=mask)


def rope_realign(k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    n_layers, n_kv_heads, capacity, head_dim = k.shape
    planes = k.view(n_layers * n_kv_heads, capacity, head_dim)  # needs the buffer contiguous
    cos, sin = cos.contiguous(), sin.contiguous()
    n = positions.numel()
    grid = (triton.cdiv(n, BLOCK_N), n_layers * n_kv_heads)
    _rope_realign_kernel[grid](
        planes,
        positions,
        cos,
        sin,
        n,
        planes.stride(0),
        planes.stride(1),
        cos.stride(0),
        HALF=head_dim // 2,
        BLOCK_N=BLOCK_N,
        BLOCK_HALF=triton.next_power_of_2(head_dim // 2),
    )
