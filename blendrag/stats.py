"""What one prefill and one answer cost. The engine fills them, a backend whose model runs
elsewhere (vLLM) fills the same fields it can tell, and every front end reports them:
``to_dict`` gives the field names the CLI's ``--json`` and the API's responses carry."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .config import Mode


@dataclass(frozen=True)
class PrefillStats:
    """None marks what a backend cannot tell (the vLLM backend: see ``api/vllm_backend.py``)."""

    mode: Mode
    n_tokens: int  # prompt tokens
    n_recomputed: int | None  # prompt tokens computed in the last layer; the rest reused stored KV
    compute_fraction: float | None  # token-layers computed / (prompt tokens x layers)
    cache_hits: int  # chunks whose KV came from the store
    cache_misses: int  # chunks whose KV was computed for this prompt
    load_stall_s: float | None  # time the forward pass waited for stored KV to load
    ttft_s: float | None  # prefill time to the first token's logits

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class GenerationStats(PrefillStats):
    n_generated: int
    decode_s: float | None  # from the first token to the last
