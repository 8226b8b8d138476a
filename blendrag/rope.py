"""Rotary position embeddings: the frequencies come from transformers' own RoPE initialisers, so
every rope type a checkpoint declares (default, llama3, linear, yarn, ...) matches HF exactly."""

from __future__ import annotations

import torch
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS


def _rope_parameters(config: PretrainedConfig) -> dict:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return dict(params)


class Rotary:
    """cos/sin tables by absolute position. Positions are explicit everywhere in blendrag: a
    token's rotation depends only on its true position, never on where it sits in a tensor."""

    def __init__(self, config: PretrainedConfig, head_dim: int) -> None:
        params = _rope_parameters(config)
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type == "default":
            base = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
            self.inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
            self.scaling = 1.0
        else:
            self.inv_freq, self.scaling = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Tables of shape ``[len(positions), head_dim]``, computed in fp32 as HF does."""
        inv_freq = self.inv_freq.to(positions.device)
        freqs = positions[:, None].float() * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.scaling).to(dtype), (emb.sin() * self.scaling).to(dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply RoPE to ``x[..., n_tokens, head_dim]`` with tables ``[n_tokens, head_dim]``."""
    half = x.shape[-1] // 2
    rotated_half = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated_half * sin


def unrotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, scaling: float) -> torch.Tensor:
    """The inverse of ``rotate`` with the same tables: their attention factor ``scaling`` (1 but
    for e.g. YaRN) is in both cos and sin, so ``rotate`` scales by it and this divides it out."""
    return rotate(x, cos, -sin) / scaling**2
