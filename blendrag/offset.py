"""Offset correction of reused chunk KV (AgentKVShift, arXiv 2607.21604).

A chunk precomputed alone misses the context it is read in; at each layer that shifts its K/V
by an amount that is partly common to the whole chunk: with full prefill's KV as the truth, a
chunk's mean residual (fresh minus reused, per layer and KV head) holds 20-55 % of the keys'
residual energy and 5-40 % of the values' on SmolLM2 (``python -m eval.deviation``). The tokens
``blend`` recomputes are probes of that shift: at every layer, the mean of their residuals in a
chunk, times ``weight``, is added to the chunk's other tokens before the layer's attention reads
them, and stays in the buffer for decoding.

With ``bandwidth`` > 0 each token gets instead a position-weighted mean of its chunk's probes
(weights ``exp(-distance / bandwidth)``): the shift drifts along a chunk, and the nearest probes
estimate it better than the whole chunk's (``docs/decisions/0012-offset-correction.md``).

Keys are stored rotated, so their residuals are taken back to the un-rotated frame (where a shift
common to the chunk is one vector) and the shift is rotated to each corrected token's position.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .kvbuffer import KVBuffer
from .rope import Rotary, rotate, unrotate


class OffsetCorrection:
    """Called by ``run_layers`` at each layer with the active positions' fresh rotated keys and
    values, before they are written over the reused ones in ``kv``."""

    def __init__(
        self,
        spans: Sequence[tuple[int, int]],
        weight: float,
        rotary: Rotary,
        kv: KVBuffer,
        bandwidth: float = 0.0,
    ) -> None:
        """``spans``: (start, length) of each reused chunk that may be corrected; ``bandwidth``: 0
        for the chunk's mean residual, else the position scale of the probes' weights."""
        device = kv.k.device
        self.weight, self.bandwidth = weight, bandwidth
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
        self._cached: _Layout | None = None

    def __call__(
        self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv: KVBuffer
    ) -> None:
        layout = self._layout(positions)
        if layout is None:
            return
        probe, probes, targets = layout.probe, layout.probes, layout.targets
        # Residuals [Hkv, n_probes, D]; keys un-rotated (rotation by -angle) to a common frame.
        res_k = k[:, probe].float() - kv.k[layer][:, probes].float()
        res_k = unrotate(res_k, self.cos[probes], self.sin[probes], self.scaling)
        res_v = v[:, probe].float() - kv.v[layer][:, probes].float()
        add_k = rotate(self._shifts(res_k, layout), self.cos[targets], self.sin[targets])
        add_v = self._shifts(res_v, layout)
        kv.k[layer].index_add_(1, targets, add_k.to(kv.k.dtype), alpha=self.weight)
        kv.v[layer].index_add_(1, targets, add_v.to(kv.v.dtype), alpha=self.weight)

    def _layout(self, positions: torch.Tensor) -> _Layout | None:
        """The layout for these active positions; None when nothing is to be done. The active
        set changes only at a filter layer, so the layout of the last ``positions`` seen is kept."""
        if positions is not self._positions:
            self._positions, self._cached = positions, self._compute_layout(positions)
        return self._cached

    def _compute_layout(self, positions: torch.Tensor) -> _Layout | None:
        span = self.span_of[positions]
        probe = span >= 0
        if not bool(probe.any()):
            return None
        targets = self.span_of.clone()
        targets[positions] = -1  # what is recomputed here gets fresh K/V instead
        targets = (targets >= 0).nonzero().flatten()
        if targets.numel() == 0:
            return None
        layout = _Layout(probe, positions[probe], span[probe], targets, self.span_of[targets])
        if self.bandwidth > 0:
            layout.blocks = self._kernel_blocks(layout)
        return layout

    def _kernel_blocks(self, layout: _Layout) -> list[tuple[slice, slice, torch.Tensor]]:
        """Per span with probes and targets: (its probes, its targets, the targets' weights over
        the probes, rows summing to 1). Positions are sorted: each span's are contiguous runs."""
        probe_ends = [0, *torch.bincount(layout.span, minlength=self.n_spans).cumsum(0).tolist()]
        target_ends = [0, *torch.bincount(layout.target_span, minlength=self.n_spans).cumsum(0).tolist()]
        blocks = []
        for c in range(self.n_spans):
            probes, targets = (
                slice(probe_ends[c], probe_ends[c + 1]),
                slice(target_ends[c], target_ends[c + 1]),
            )
            if probes.stop > probes.start and targets.stop > targets.start:
                distance = (layout.targets[targets, None] - layout.probes[None, probes]).abs().float()
                blocks.append((probes, targets, torch.softmax(-distance / self.bandwidth, dim=1)))
        return blocks

    def _shifts(self, residuals: torch.Tensor, layout: _Layout) -> torch.Tensor:
        """The shift of each target, ``[Hkv, n_targets, D]`` (zero in a span without probes)."""
        if self.bandwidth == 0:
            return self._span_means(residuals, layout.span)[:, layout.target_span]
        shifts = residuals.new_zeros(residuals.shape[0], layout.targets.numel(), residuals.shape[2])
        for probes, targets, weights in layout.blocks:
            shifts[:, targets] = weights @ residuals[:, probes]
        return shifts

    def _span_means(self, residuals: torch.Tensor, span: torch.Tensor) -> torch.Tensor:
        """Mean residual of each span's probes, ``[Hkv, n_spans, D]`` (zero for a span without)."""
        heads, _, dim = residuals.shape
        sums = residuals.new_zeros(heads, self.n_spans, dim).index_add_(1, span, residuals)
        counts = torch.bincount(span, minlength=self.n_spans).clamp(min=1)
        return sums / counts[None, :, None]


@dataclass
class _Layout:
    """Which active rows are probes (``probe``, a mask), their positions and spans; the positions
    to correct and their spans; with a bandwidth, the per-span weights (``_kernel_blocks``)."""

    probe: torch.Tensor
    probes: torch.Tensor
    span: torch.Tensor
    targets: torch.Tensor
    target_span: torch.Tensor
    blocks: list[tuple[slice, slice, torch.Tensor]] = field(default_factory=list)
