"""A learned reuse adapter: a few trainable input vectors every chunk is precomputed after.

A chunk precomputed alone attends to nothing before it, so its KV misses what the chunks before
it in a prompt would have added, and its first token turns into an attention sink. The adapter
is a *header*: ``n_tokens`` embedding vectors run in front of each chunk when its KV is computed
(positions 0..n-1, the chunk after them). Only the chunk's own KV is stored; the header conditions
it and is dropped, so a fused prompt's layout, positions and length are unchanged. The model stays
frozen: ``blendrag tune`` (``blendrag.tune``) trains the header by self-distillation, so that
blending KV computed after it matches full prefill's next-token distributions (KV Packet, arXiv
2604.13226; KVLink).

The header's bytes are hashed into the engine's fingerprint, so KV computed after one header is
never read by an engine with another header or none.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import BlendRAGError
from .forward import run_layers
from .kvbuffer import LayerListKV
from .model import Transformer
from .rope import Rotary

TENSOR_NAME = "header"
# Shipped with the package: the adapter `blendrag tune` trained for the bundled model
# (docs/decisions/0013-reuse-adapter.md); ``adapter="bundled"`` names it.
BUNDLED = "bundled"
BUNDLED_PATH = Path(__file__).parent / "adapters" / "SmolLM2-135M-Instruct.safetensors"


class ReuseAdapter(nn.Module):
    def __init__(self, header: torch.Tensor) -> None:
        super().__init__()
        self.header = nn.Parameter(header.detach().float().clone())  # [n_tokens, model dim]

    @classmethod
    def from_token_embeddings(cls, model: Transformer, token_ids: list[int]) -> ReuseAdapter:
        """An adapter whose header starts as the embeddings of real tokens (training's start)."""
        with torch.no_grad():
            return cls(model.embed_tokens(torch.tensor(token_ids, device=model.embed_tokens.weight.device)))

    @property
    def n_tokens(self) -> int:
        return self.header.shape[0]

    def digest(self) -> str:
        """Hash of the header's values: part of the engine fingerprint that keys chunk KV."""
        data = self.header.detach().float().cpu().contiguous()
        h = hashlib.sha256(str(tuple(data.shape)).encode())
        h.update(data.numpy().tobytes())
        return h.hexdigest()[:16]

    def check_model(self, model: Transformer) -> None:
        if self.header.shape[1] != model.args.dim:
            raise BlendRAGError(
                f"the adapter's vectors have {self.header.shape[1]} dimensions, the model's "
                f"embeddings {model.args.dim}: it was trained for another model"
            )

    def segment_kv(
        self, model: Transformer, rotary: Rotary, token_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A chunk's un-rotated K and V ``[n_layers, n_kv_heads, n, head_dim]``, computed after
        the header; differentiable with respect to the header (``blendrag tune``)."""
        embeds = model.embed_tokens(token_ids)
        inputs = torch.cat([self.header.to(device=embeds.device, dtype=embeds.dtype), embeds])
        n = inputs.shape[0]
        kv = LayerListKV(model.args, n, embeds.dtype, embeds.device)
        kv.length = n
        positions = torch.arange(n, device=embeds.device)
        out = run_layers(
            model, rotary, kv, token_ids, positions, capture=True, last_row_only=True, embeds=inputs
        )
        chunk = slice(self.n_tokens, None)  # the header's own KV is dropped
        k = torch.stack([k[:, chunk] for k in out.captured_k])
        return k, torch.stack([v[:, chunk] for v in out.captured_v])

    def save(self, path: str | Path, model_fingerprint: str) -> None:
        """Write the header to a safetensors file (atomically: a killed save leaves the old one)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        metadata = {"format": "blendrag-reuse-adapter", "trained_for": model_fingerprint}
        save_file({TENSOR_NAME: self.header.detach().float().cpu().contiguous()}, str(tmp), metadata)
        tmp.chmod(0o644)  # safetensors writes 0o600; an adapter is meant to be shared like a model
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> ReuseAdapter:
        """An adapter file ``blendrag tune`` wrote, or ``"bundled"``: the one for the bundled model."""
        if str(path) == BUNDLED:
            path = BUNDLED_PATH
        try:
            tensors = load_file(str(path))
        except (OSError, SafetensorError) as err:
            raise BlendRAGError(f"adapter {path}: {err}") from None
        if set(tensors) != {TENSOR_NAME} or tensors[TENSOR_NAME].dim() != 2:
            raise BlendRAGError(f"adapter {path}: expected one 2-D tensor named {TENSOR_NAME!r}")
        return cls(tensors[TENSOR_NAME])
