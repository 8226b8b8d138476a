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
from typing import TYPE_CHECKING

import torch
from torch.profiler import record_function

from . import kernels
from .kvbuffer import KVBuffer
from .model import Transformer, attend
from .rope import Rotary, rotate

if TYPE_CHECKING:
    from .kernels import Mask


@dataclass
class LayerView:
    """What a filter sees at its layer: the active positions, their rotated queries, the
    deviation of their fresh V from the V the buffer held before (``[n]``, CacheBlend's
    ||V_fresh - V_cached||^2), and the buffer, which now holds their fresh K/V."""

    layer: int
    positions: torch.Tensor
    q: torch.Tensor
    deviation: torch.Tensor
    kv: KVBuffer


# Returns indices into the active rows to keep.
Filter = Callable[[LayerView], torch.Tensor]

# Called at each layer with (layer, active positions, their fresh rotated K and V, the buffer)
# before the fresh K/V are written: it may change the reused K/V of the other positions
# (``blendrag.offset.OffsetCorrection``).
Correction = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, KVBuffer], None]

# Replaces ``model.attend`` in every layer: (q [H, n, D], keys, values [Hkv, T, D], the queries'
# positions) -> attention output [H, n, D], causal by position. The preview uses it to
# read the attention weights it computes anyway.
Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class LayerLoopResult:
    hidden: torch.Tensor  # after the final layer: of the active tokens (the last only: last_row_only)
    n_active_per_layer: list[int]
    positions: torch.Tensor  # the active positions of the final layer (all of them: last_row_only too)
    captured_k: list[torch.Tensor] = field(default_factory=list)  # per layer, before RoPE
    captured_v: list[torch.Tensor] = field(default_factory=list)

    @property
    def last_hidden(self) -> torch.Tensor:
        return self.hidden[-1]


def causal_mask(positions: torch.Tensor, length: int) -> Mask | None:
    """The mask for queries at ``positions`` over ``length`` slots: None when plain causal
    attention means the same (all ``length`` positions, or one query at the last position),
    else the causal-by-position mask from the kernels."""
    if positions.numel() == length or (positions.numel() == 1 and int(positions[0]) == length - 1):
        return None
    return kernels.selective_mask(positions, length)


def run_layers(
    model: Transformer,
    rotary: Rotary,
    kv: KVBuffer,
    token_ids: torch.Tensor,
    positions: torch.Tensor,
    filters: dict[int, Filter] | None = None,
    capture: bool = False,
    attention: Attention | None = None,
    last_row_only: bool = False,
    correction: Correction | None = None,
    embeds: torch.Tensor | None = None,
) -> LayerLoopResult:
    """Run all layers for ``token_ids`` at sorted ``positions`` (all < ``kv.length``).

    ``last_row_only``: the final layer writes every row's K/V but finishes (attention, MLP) the
    last row only, for callers that read only the last token's output (a prefill's logits): the
    other rows' final outputs feed nothing, and skipping them saves 1/n_layers of the work.
    ``embeds``: the input rows, instead of ``token_ids``' embeddings (an adapter's header)."""
    filters = filters or {}
    h = model.embed_tokens(token_ids) if embeds is None else embeds
    cos, sin = rotary.cos_sin(positions, h.dtype)
    mask = causal_mask(positions, kv.length)
    result = LayerLoopResult(h, [], positions)
    # Up to its first filter, a filtered pass runs every token it started with.
    first_filter = min(filters, default=-1)
    for i, block in enumerate(model.layers):
        kv.wait(i)  # a background load of reused KV may still be filling this layer
        # Profiler labels (free when no profiler runs): bench/profile_blend.py splits time on them.
        with record_function("blendrag.layers_all_tokens" if i <= first_filter else "blendrag.layers"):
            q, k, v = block.qkv(h)
            if capture:
                result.captured_k.append(k)
                result.captured_v.append(v)
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
            if correction is not None:
                correction(i, positions, k, v, kv)
            if i in filters:
                deviation = kernels.kv_deviation(v, kv.v[i], positions)
                kv.write(i, positions, k, v)
                with record_function("blendrag.select"):
                    keep = filters[i](LayerView(i, positions, q, deviation, kv))
                h, q, positions = h[keep], q[:, keep], positions[keep]
                cos, sin, mask = cos[keep], sin[keep], causal_mask(positions, kv.length)
            else:
                kv.write(i, positions, k, v)
            result.n_active_per_layer.append(positions.numel())
            result.positions = positions
            if last_row_only and i == len(model.layers) - 1:
                h, q, positions = h[-1:], q[:, -1:], positions[-1:]
                mask = causal_mask(positions, kv.length)
            if attention is None:
                a = attend(q, kv.keys(i), kv.values(i), mask)
            else:
                a = attention(q, kv.keys(i), kv.values(i), positions)
            h = block.finish(h, a)
    result.hidden = h
    return result


def append_tokens(
    model: Transformer, rotary: Rotary, kv: KVBuffer, token_ids: torch.Tensor, last_row_only: bool = False
) -> torch.Tensor:
    """Run ``token_ids`` at the next positions of ``kv`` (its length grows by their number) over
    what it holds; their next-token logits (the last one's only with ``last_row_only``)."""
    start = kv.length
    kv.length += token_ids.numel()
    positions = torch.arange(start, kv.length, device=token_ids.device)
    out = run_layers(model, rotary, kv, token_ids, positions, last_row_only=last_row_only)
    return model.logits(out.hidden)
