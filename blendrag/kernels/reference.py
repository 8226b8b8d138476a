"""Torch implementations of every kernel op: the CPU path and the oracle the Triton tests use."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def rope_realign(
    k: torch.Tensor, segments: Sequence[tuple[int, int]], cos: torch.Tensor, sin: torch.Tensor
) -> None:
    """Rotate the ``(start, length)`` segments of ``k`` (every layer) in place by the tables' rows
    at their positions.

    ``rope.rotate``'s arithmetic, written on the two halves of the head dimension: a slice per
    segment and no concatenated rotated-half copy, several times faster on CPU than rotating
    gathered positions, and bitwise equal to it, so that reused and recomputed keys at one
    position are bitwise equal on CPU.
    """
    half = k.shape[-1] // 2
    for start, length in segments:
        end = start + length
        x1, x2 = k[:, :, start:end, :half], k[:, :, start:end, half:]
        c1, c2 = cos[start:end, :half], cos[start:end, half:]
        s1, s2 = sin[start:end, :half], sin[start:end, half:]
        first = x1 * c1
        first -= x2 * s1  # rotate: x1 * c1 + (-x2) * s1
        second = x2 * c2
        second += x1 * s2
        x1.copy_(first)
        x2.copy_(second)


def kv_deviation(v_fresh: torch.Tensor, v_layer: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``||v_fresh - v_layer[:, positions]||^2`` over heads and head dim, in fp32: ``[n]``."""
    v_old = v_layer.index_select(1, positions)
    return (v_fresh.float() - v_old.float()).pow(2).sum(dim=(0, 2))


def kv_scatter(
    k_layer: torch.Tensor, v_layer: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> None:
    k_layer.index_copy_(1, positions, k)
    v_layer.index_copy_(1, positions, v)


def causal_by_position(positions: torch.Tensor, length: int) -> torch.Tensor:
    """Boolean ``[n, length]``: query at position p may attend to keys at positions <= p."""
    return torch.arange(length, device=positions.device)[None, :] <= positions[:, None]


def selective_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    out = F.scaled_dot_product_attention(q[None], keys[None], values[None], attn_mask=mask, enable_gqa=True)
    return out[0]
