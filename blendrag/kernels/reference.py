"""Torch implementations of every kernel op: the CPU path and the oracle the Triton tests use."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..rope import rotate


def rope_realign(k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate ``k[:, :, positions]`` of every layer in place by the tables' rows at ``positions``.

    Same arithmetic as rotating a fresh key (``rope.rotate`` in the buffer's dtype), so reused and
    recomputed keys at one position are bitwise equal on CPU.
    """
    k[:, :, positions] = rotate(k[:, :, positions], cos[positions], sin[positions])


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
