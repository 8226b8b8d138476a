"""Write recomputed tokens' K and V into one layer of the buffer at their positions, in one launch."""

from __future__ import annotations

import torch

from ._triton import tl, triton

BLOCK_N = 32


@triton.jit
def _copy_rows(src_ptr, dst_ptr, rows, pos, src_stride_row, dst_stride_pos, cols, mask):
    values = tl.load(src_ptr + rows[:, None] * src_stride_row + cols[None, :], mask=mask)
    tl.store(dst_ptr + pos[:, None] * dst_stride_pos + cols[None, :], values, mask=mask)


@triton.jit
def _kv_scatter_kernel(
    k_ptr,
    v_ptr,
    k_layer_ptr,
    v_layer_ptr,
    pos_ptr,
    n,
    k_stride_head,
    k_stride_row,
    v_stride_head,
    v_stride_row,
    layer_stride_head,
    layer_stride_pos,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # Program (i, h): BLOCK_N tokens of kv head h.
    head = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    pos = tl.load(pos_ptr + rows, mask=rows < n, other=0)
    mask = (rows < n)[:, None] & (cols < HEAD_DIM)[None, :]
    dst_offset = head * layer_stride_head
    k_src, v_src = k_ptr + head * k_stride_head, v_ptr + head * v_stride_head
    _copy_rows(k_src, k_layer_ptr + dst_offset, rows, pos, k_stride_row, layer_stride_pos, cols, mask)
    _copy_rows(v_src, v_layer_ptr + dst_offset, rows, pos, v_stride_row, layer_stride_pos, cols, mask)


def kv_scatter(
    k_layer: torch.Tensor, v_layer: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> None:
    n_kv_heads, n, head_dim = k.shape
    assert k_layer.stride() == v_layer.stride(), "K and V buffers share one layout"
    _kv_scatter_kernel[(triton.cdiv(n, BLOCK_N), n_kv_heads)](
        k,
        v,
        k_layer,
        v_layer,
        positions,
        n,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        k_layer.stride(0),
        k_layer.stride(1),
        HEAD_DIM=head_dim,
        BLOCK_N=BLOCK_N,
        BLOCK_D=triton.next_power_of_2(head_dim),
    )
