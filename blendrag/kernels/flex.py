"""Selective attention with FlexAttention: a block mask built from the query positions skips the
key blocks every query in a block is causally past, which a dense boolean mask cannot."""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

# Compiled on first call; eager flex_attention is a dense reference that materialises all scores.
_compiled_flex = torch.compile(flex_attention)


def block_mask(positions: torch.Tensor, length: int) -> BlockMask:
    """Query i (at true position ``positions[i]``) sees keys at positions <= ``positions[i]``."""

    def causal_by_position(b, h, q_idx, kv_idx):
        return kv_idx <= positions[q_idx]

    return create_block_mask(
        causal_by_position, None, None, positions.numel(), length, device=positions.device
    )


def selective_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: BlockMask
) -> torch.Tensor:
    out = _compiled_flex(q[None], keys[None], values[None], block_mask=mask, enable_gqa=True)
    return out[0]
