"""A Llama-family decoder written for layer-wise, token-selective execution.

Module names follow Hugging Face's so a checkpoint's state dict loads as is. Unlike an HF model,
nothing here owns a KV cache or positions: a layer is driven in two steps by the caller,
``qkv`` (projections for the tokens being computed) and ``finish`` (their attention over whatever
KV the caller assembled, then the MLP). That split is what lets blending compute K/V for some
tokens, compare them with cached K/V, and continue with only a subset.

Supported: Llama 2/3/3.1 (rope scaling), Mistral (full attention: sliding windows are not
applied), Qwen2 (q/k/v bias), Qwen3 (per-head q/k RMSNorm). Activations are ``[n_tokens, dim]``:
one sequence, no batch dimension.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from . import kernels

if TYPE_CHECKING:
    from .kernels import Mask

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class ModelArgs:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    norm_eps: float
    qkv_bias: bool
    qk_norm: bool
    tie_embeddings: bool

    @classmethod
    def from_hf(cls, config: PretrainedConfig) -> ModelArgs:
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model type {config.model_type!r}; supported: {SUPPORTED_MODEL_TYPES}"
            )
        n_heads = config.num_attention_heads
        return cls(
            vocab_size=config.vocab_size,
            dim=config.hidden_size,
            n_layers=config.num_hidden_layers,
            n_heads=n_heads,
            n_kv_heads=getattr(config, "num_key_value_heads", None) or n_heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // n_heads,
            intermediate_size=config.intermediate_size,
            norm_eps=config.rms_norm_eps,
            qkv_bias=config.model_type == "qwen2" or bool(getattr(config, "attention_bias", False)),
            qk_norm=config.model_type == "qwen3",
            tie_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        )


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 like HF, so bf16/fp16 checkpoints match the reference implementation.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.q_proj = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=args.qkv_bias)
        self.k_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.v_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.o_proj = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        if args.qk_norm:
            self.q_norm = RMSNorm(args.head_dim, args.norm_eps)
            self.k_norm = RMSNorm(args.head_dim, args.norm_eps)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-head q ``[H, n, D]``, k and v ``[Hkv, n, D]``, before RoPE."""
        n, a = x.shape[0], self.args
        q = self.q_proj(x).view(n, a.n_heads, a.head_dim)
        k = self.k_proj(x).view(n, a.n_kv_heads, a.head_dim)
        v = self.v_proj(x).view(n, a.n_kv_heads, a.head_dim)
        if a.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: Mask | None) -> torch.Tensor:
    """Grouped-query attention of ``q [H, n, D]`` over ``keys/values [Hkv, T, D]``.

    ``mask`` comes from ``kernels.selective_mask`` (queries at arbitrary true positions);
    ``None`` means the n queries are the last n of the T positions: plain causal attention.
    """
    if mask is not None:
        return kernels.selective_attention(q, keys, values, mask)
    n, t = q.shape[1], keys.shape[1]
    out = F.scaled_dot_product_attention(
        q[None], keys[None], values[None], is_causal=n > 1 and n == t, enable_gqa=True
    )
    return out[0]


class MLP(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(args.dim, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.dim, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = MLP(args)
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)

    def qkv(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.self_attn.qkv(self.input_layernorm(h))

    def finish(self, h: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """The rest of the layer for the rows of ``h``, given their attention output ``a [H, n, D]``
        (``attend`` over the assembled KV): output projection, residual, then the MLP."""
        h = h + self.self_attn.o_proj(a.transpose(0, 1).reshape(h.shape[0], -1))
        return h + self.mlp(self.post_attention_layernorm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        if not args.tie_embeddings:
            self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        weight = self.embed_tokens.weight if self.args.tie_embeddings else self.lm_head.weight
        return F.linear(self.norm(h), weight).float()

    def load_hf_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load an HF ``*ForCausalLM`` state dict (``model.`` prefix, optional ``lm_head``)."""
        renamed = {k.removeprefix("model."): v for k, v in state.items()}
        if self.args.tie_embeddings:
            renamed.pop("lm_head.weight", None)
        renamed = {k: v for k, v in renamed.items() if not k.endswith("rotary_emb.inv_freq")}
        self.load_state_dict(renamed, strict=True)
