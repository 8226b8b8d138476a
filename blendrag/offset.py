"""Offset correction of reused chunk KV (AgentKVShift, arXiv 2607.21604).

A chunk precomputed alone misses the context it is read in; at each layer that shifts its K/V
by an amount that is partly common to the whole chunk: with full prefill's KV as the truth, a
chunk's mean residual (fresh minus reused, per layer and KV head) holds 20-55 % of the keys'
residual energy and 5-40 % of the values' on SmolLM2 (``python -m eval.deviation``). The tokens
``blend`` recomputes are probes of that shift: at every layer, the mean of their residuals in a
chunk, times ``weight``, is added to the chunk's other tokens before the layer's attention reads
them, and stays in the buffer for decoding.

Keys are stored rotated, so their residuals are taken back to the un-rotated frame (where a shift
common to the chunk is one vector) and the mean is rotated to each corrected token's position.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .kvbuffer import KVBuffer
from .rope import Rotary, rotate, unrotate


class OffsetCorrection:
    """Called by ``run_layers`` at each layer with the active positions' fresh rotated keys and
    values, before they are written over the reused ones in ``kv``."""

    def __init__(self, spans: Sequence[tuple[int, int]], weight: float, rotary: Rotary, kv: KVBuffer) -> None:
        """``spans``: (start, length) of each reused chunk that may be corrected."""
        device = kv.k[0].device
        self.weight = weight
        self.n_spans = len(spans)
        # span_of[p]: the span holding position p, or -1 (prefix, question, answer). A chunk's
        # first token is left out: prefilled alone, a chunk turns it into an attention sink, whose
        # residual is large and unlike its other tokens' (leaving it out measured better).
        self.span_of = torch.full((kv.length,), -1, dtype=torch.long, device=device)
        for i, (start, length) in enumerate(spans):
            self.span_of[start + 1 : start + length] = i
        self.cos, self.sin = rotary.cos_sin(torch.arange(kv.length, device=device), torch.float32)
        self.scaling = rotary.scaling
        self._positions: torch.Tensor | None = None  # the active positions _cached is for
        self._cached: tuple[torch.Tensor, ...] | None = None

    def __call__(
        self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv: KVBuffer
    ) -> None:
        layout = self._layout(positions)
        if layout is None:
            return
        probe, probes, span, targets, target_span = layout
        # Residuals [Hkv, n_probes, D]; keys un-rotated (rotation by -angle) to a common frame.
        res_k = k[:, probe].float() - kv.k[layer][:, probes].float()
        res_k = unrotate(res_k, self.cos[probes], self.sin[probes], self.scaling)
        res_v = v[:, probe].float() - kv.v[layer][:, probes].float()
        shift_k, shift_v = self._span_means(res_k, span), self._span_means(res_v, span)
        add_k = rotate(shift_k[:, target_span], self.cos[targets], self.sin[targets])
        add_v = shift_v[:, target_span]
        kv.k[layer].index_add_(1, targets, add_k.to(kv.k[layer].dtype), alpha=self.weight)
        kv.v[layer].index_add_(1, targets, add_v.to(kv.v[layer].dtype), alpha=self.weight)

    def _layout(self, positions: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
        """Which active rows are probes, their positions and spans, and the positions (and spans)
        to correct; None when nothing is to be done. The active set changes only at a filter
        layer, so the layout of the last ``positions`` tensor seen is kept."""
        if positions is not self._positions:
            self._positions, self._cached = positions, self._compute_layout(positions)
        return self._cached

    def _compute_layout(self, positions: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
        span = self.span_of[positions]
        probe = span >= 0
        if not bool(probe.any()):
            return None
        targets = self.span_of.clone()
        targets[positions] = -1  # what is recomputed here gets fresh K/V instead
        targets = (targets >= 0).nonzero().flatten()
        if targets.numel() == 0:
            return None
        return probe, positions[probe], span[probe], targets, self.span_of[targets]

    def _span_means(self, residuals: torch.Tensor, span: torch.Tensor) -> torch.Tensor:
        """Mean residual of each span's probes, ``[Hkv, n_spans, D]`` (zero for a span without)."""
        heads, _, dim = residuals.shape
        sums = residuals.new_zeros(heads, self.n_spans, dim).index_add_(1, span, residuals)
        counts = torch.bincount(span, minlength=self.n_spans).clamp(min=1)
        return sums / counts[None, :, None]
