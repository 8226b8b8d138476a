"""The layer loop shared by every mode: compute some tokens, at their true positions, over a
``KVBuffer`` that already holds whatever KV is reused.

At each layer the *active* tokens get fresh Q/K/V, their K/V overwrite the buffer at their
positions, then their queries attend over the whole buffer with a causal mask by true position
(a recomputed token at position p sees positions <= p and nothing later, wherever it sits in the
tensor). A ``filter`` may, at chosen layers, narrow the active set: tokens dropped there keep the
K/V the buffer holds for every later layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .kvbuffer import KVBuffer
from .model import Transformer
from .rope import Rotary, rotate


@dataclass
class LayerView:
    """What a filter sees at its layer: active positions, their rotated queries, fresh K/V,
    and the K/V the buffer held for them before this layer overwrote it."""

    layer: int
    positions: torch.Tensor
    q: torch.Tensor
    k_fresh: torch.Tensor
    v_fresh: torch.Tensor
    k_old: torch.Tensor
    v_old: torch.Tensor
    kv: KVBuffer


# Returns indices into the active rows to keep.
Filter = Callable[[LayerView], torch.Tensor]


@dataclass
class LayerLoopResult:
    last_hidden: torch.Tensor  # hidden state of the last active token after the final layer
    n_active_per_layer: list[int]
    captured_k: list[torch.Tensor] = field(default_factory=list)  # per layer, before RoPE
    captured_v: list[torch.Tensor] = field(default_factory=list)


def causal_mask(positions: torch.Tensor, length: int) -> torch.Tensor | None:
    """Boolean ``[n, length]`` mask, or None when the active tokens are exactly the last n
    positions (then plain causal attention is the same thing and cheaper)."""
    n = positions.numel()
    first = int(positions[0])
    if int(positions[-1]) == length - 1 and length - first == n:
        return None
    return torch.arange(length, device=positions.device)[None, :] <= positions[:, None]


def run_layers(
    model: Transformer,
    rotary: Rotary,
    kv: KVBuffer,
    token_ids: torch.Tensor,
    positions: torch.Tensor,
    filters: dict[int, Filter] | None = None,
    capture: bool = False,
) -> LayerLoopResult:
    """Run all layers for ``token_ids`` at sorted ``positions`` (all < ``kv.length``)."""
    filters = filters or {}
    h = model.embed_tokens(token_ids)
    cos, sin = rotary.cos_sin(positions, h.dtype)
    mask = causal_mask(positions, kv.length)
    result = LayerLoopResult(h, [])
    for i, block in enumerate(model.layers):
        q, k, v = block.qkv(h)
        if capture:
            result.captured_k.append(k)
            result.captured_v.append(v)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        if i in filters:
            k_old, v_old = kv.read(i, positions)
            kv.write(i, positions, k, v)
            keep = filters[i](LayerView(i, positions, q, k, v, k_old, v_old, kv))
            h, q, positions = h[keep], q[:, keep], positions[keep]
            cos, sin, mask = cos[keep], sin[keep], causal_mask(positions, kv.length)
        else:
            kv.write(i, positions, k, v)
        result.n_active_per_layer.append(positions.numel())
        h = block.finish(h, q, kv.keys(i), kv.values(i), mask)
    result.last_hidden = h[-1]
    return result
