"""The knobs of blending, in one small frozen dataclass (``dataclasses.replace`` makes variants)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

# The prefill modes (see BlendEngine) and selectors, each listed once: the tuples are the Literals'.
Mode = Literal["full", "prefix", "reuse", "blend"]
MODES: tuple[Mode, ...] = get_args(Mode)
Selector = Literal["deviation", "attention", "attention_deviation", "preview"]
SELECTORS: tuple[Selector, ...] = get_args(Selector)


@dataclass(frozen=True)
class BlendConfig:
    """How ``blend`` picks the chunk tokens it recomputes. The defaults are what the evaluation
    chose on MuSiQue with SmolLM2-135M (docs/decisions/0001-preview-selection.md).

    recompute_ratio: share of chunk tokens recomputed in the layers after the check layer.
    check_layer: layers ``0..check_layer-1`` run on every token, and at ``check_layer`` every
        token's K/V is computed fresh and scored; only the selected tokens go on. ``preview``
        scores before the pass, so it needs no such layer (0).
    selector: the score tokens are ranked by at the check layer.
        ``deviation``: CacheBlend's ||V_fresh - V_cached||^2 over heads and head dim.
        ``attention``: attention weight the question's queries give each token (query-aware).
        ``attention_deviation``: their product, an estimate of each token's error contribution
        to the question's attention output.
        ``preview``: before blending, the question alone runs over the reused KV (what ``reuse``
        computes), then drafts ``preview_draft`` answer tokens greedily; the attention their
        queries pay each chunk token, summed over all layers, ranks the tokens (query- and
        answer-aware, and aware of the deep layers that layer-1 deviation cannot see).
    gradual_layers: extra filter layers after the check layer (CacheBlend's gradual filtering):
        the kept share halves at each, from ``ratio * 2**g`` down to ``ratio``.
    first_k: always recompute the first k tokens of every chunk (EPIC's fix for the attention
        sink each separately prefilled chunk learns); they count against the ratio.
    offset_weight: offset correction (``blendrag.offset``): at every layer, this share of the
        mean residual (fresh minus reused K/V) of a chunk's recomputed tokens is added to the
        chunk's other tokens. 0 turns it off (docs/decisions/0012-offset-correction.md).
    """

    recompute_ratio: float = 0.15
    check_layer: int = 0
    selector: Selector = "preview"
    gradual_layers: int = 0
    first_k: int = 0
    preview_draft: int = 0
    offset_weight: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.recompute_ratio <= 1.0:
            raise ValueError(f"recompute_ratio must be in [0, 1], got {self.recompute_ratio}")
        if min(self.check_layer, self.gradual_layers, self.first_k, self.preview_draft) < 0:
            raise ValueError("check_layer, gradual_layers, first_k and preview_draft must be >= 0")
        if not 0.0 <= self.offset_weight <= 1.0:
            raise ValueError(f"offset_weight must be in [0, 1], got {self.offset_weight}")
        if self.selector not in SELECTORS:
            raise ValueError(f"selector must be one of {SELECTORS}, got {self.selector!r}")
        if self.selector in ("deviation", "attention_deviation") and self.check_layer < 1:
            # A token's layer-0 V depends on the token alone: fresh and cached are equal there.
            raise ValueError(f"selector {self.selector!r} needs check_layer >= 1 (no deviation at layer 0)")

    def keep_ratios(self) -> list[tuple[int, float]]:
        """(layer, share of chunk tokens kept after it) for each filter layer."""
        g = self.gradual_layers
        return [(self.check_layer + j, min(1.0, self.recompute_ratio * 2 ** (g - j))) for j in range(g + 1)]
