"""The noise floor of fidelity: full prefill with its KV cache kept in a lower precision, or with
its weights rounded, the losses users already accept from a serving stack (a bf16 or fp8 KV
cache, bf16 weights). ``eval.fidelity`` prints them beside every blend, so a report shows how far
blend is from "as faithful as a KV cache format".

Names: ``kv=bf16``, ``kv=fp16``, ``kv=fp8`` (a saturating cast, no scales), ``kv=fp8-token``
(fp8 e4m3 with one scale per head and token), ``weights=bf16`` (weights rounded to bf16,
computed in the engine's dtype). A rounded KV cache rounds every K/V written, prompt and answer
tokens alike; keys are rounded after RoPE, as a serving KV cache holds them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from blendrag.engine import BlendEngine
from blendrag.forward import append_tokens
from blendrag.kvbuffer import KVBuffer
from blendrag.model import Transformer

Rounding = Callable[[torch.Tensor], torch.Tensor]
FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max


def _cast(dtype: torch.dtype) -> Rounding:
    return lambda x: x.to(dtype).to(x.dtype)


def _fp8_saturating(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-FP8_MAX, FP8_MAX).to(FP8).to(x.dtype)


def _fp8_per_token(x: torch.Tensor) -> torch.Tensor:
    """``x [heads, tokens, head_dim]`` in fp8 with an fp32 scale per head and token."""
    scale = (x.abs().amax(dim=-1, keepdim=True).float() / FP8_MAX).clamp(min=1e-12)
    return ((x.float() / scale).to(FP8).float() * scale).to(x.dtype)


KV_ROUNDINGS: dict[str, Rounding] = {
    "bf16": _cast(torch.bfloat16),
    "fp16": _cast(torch.float16),
    "fp8": _fp8_saturating,
    "fp8-token": _fp8_per_token,
}
FLOORS = (*(f"kv={name}" for name in KV_ROUNDINGS), "weights=bf16")


class RoundedKVBuffer(KVBuffer):
    """A KV buffer that keeps every K/V written to it in a lower precision."""

    def __init__(self, *args, rounding: Rounding, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.rounding = rounding

    def write(self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        super().write(layer, positions, self.rounding(k), self.rounding(v))


@dataclass
class Prefilled:
    """What ``eval.fidelity`` scores of a prefill, an engine's or a floor's."""

    logits: torch.Tensor  # next-token logits after the prompt
    kv: KVBuffer
    n_prompt: int
    ttft_s: float
    extend: Callable[[list[int]], torch.Tensor]  # appends tokens; the logits after each
    recomputed_frac: float = 1.0


class Floor:
    """Full prefill of ``engine``'s prompts under one noise-floor name (see ``FLOORS``)."""

    def __init__(self, engine: BlendEngine, name: str) -> None:
        kind, _, value = name.partition("=")
        if name not in FLOORS:
            raise ValueError(f"unknown noise floor {name!r}; choose from {', '.join(FLOORS)}")
        self.engine = engine
        self.rounding = KV_ROUNDINGS[value] if kind == "kv" else None
        self.model = engine.model if kind == "kv" else _rounded_copy(engine.model, torch.bfloat16)

    @torch.inference_mode()
    def prefill(self, chunks: list[str], question: str, capacity: int) -> Prefilled:
        start = time.perf_counter()
        engine = self.engine
        ids = engine.build_prompt(chunks, question).ids
        args = (self.model.args, len(ids) + capacity, engine.dtype, engine.device)
        kv = RoundedKVBuffer(*args, rounding=self.rounding) if self.rounding else KVBuffer(*args)
        logits = self._forward(kv, ids, last_row_only=True)[-1]

        def extend(token_ids: list[int]) -> torch.Tensor:
            return self._forward(kv, token_ids)

        return Prefilled(logits, kv, len(ids), time.perf_counter() - start, extend)

    @torch.inference_mode()
    def _forward(self, kv: KVBuffer, token_ids: list[int], last_row_only: bool = False) -> torch.Tensor:
        ids = torch.tensor(token_ids, dtype=torch.long, device=self.engine.device)
        return append_tokens(self.model, self.engine.rotary, kv, ids, last_row_only)


def _rounded_copy(model: Transformer, dtype: torch.dtype) -> Transformer:
    """A copy of ``model`` whose weights are rounded to ``dtype``, kept in their own dtype."""
    weight = next(model.parameters())
    copy = Transformer(model.args).to(device=weight.device, dtype=weight.dtype)
    state = {name: t.to(dtype).to(t.dtype) for name, t in model.state_dict().items()}
    copy.load_state_dict(state)
    return copy.eval()
