"""A learned reuse adapter: a few trainable input vectors every chunk is precomputed after.

A chunk precomputed alone attends to nothing before it, so its KV misses what the chunks before
it in a prompt would have added, and its first token turns into an attention sink. The adapter
is a *header*: ``n_tokens`` embedding vectors run in front of each chunk when its KV is computed
(positions 0..n-1, the chunk after them). Only the chunk's own KV is stored; the header conditions
it and is dropped, so a fused prompt's layout, positions and length are unchanged. The model stays
frozen: ``blendrag tune`` (``blendrag.tune``) trains the header by self-distillation, so that
blending KV computed after it matches full prefill's next-token distributions (KV Packet, arXiv
2604.13226; KVLink).

The header's bytes are hashed into the engine's fingerprint (``adapted_fingerprint``), so KV
computed after one header is never read by an engine with another header or none. An adapter file
records the model fingerprint it was trained for; ``resolve_adapter`` turns the ``adapter``
setting of every front end ("auto", "none", "bundled" or a path) into an adapter or None, and
"auto", the default, takes the bundled adapter for exactly the model it was trained for.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
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
AUTO = "auto"  # the bundled adapter when the model is the one it was trained for, else none
NONE = "none"


class ReuseAdapter(nn.Module):
    def __init__(
        self, header: torch.Tensor, trained_for: str | None = None, path: Path | None = None
    ) -> None:
        """``trained_for``: the model fingerprint ``blendrag tune`` trained it for; ``path``: the
        file it was loaded from (what another process, vLLM's, is told to load)."""
        super().__init__()
        self.header = nn.Parameter(header.detach().float().clone())  # [n_tokens, model dim]
        self.trained_for, self.path = trained_for, path

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
        path = BUNDLED_PATH if str(path) == BUNDLED else Path(path).resolve()
        try:
            with safe_open(str(path), "pt") as f:
                names, metadata = set(f.keys()), f.metadata() or {}
                header = f.get_tensor(TENSOR_NAME) if names == {TENSOR_NAME} else None
        except (OSError, SafetensorError) as err:
            raise BlendRAGError(f"adapter {path}: {err}") from None
        if header is None or header.dim() != 2:
            raise BlendRAGError(f"adapter {path}: expected one 2-D tensor named {TENSOR_NAME!r}")
        return cls(header, metadata.get("trained_for"), path)


# What ``resolve_adapter`` takes: "auto", "none" (or None), "bundled", a path, or an adapter.
AdapterSpec = ReuseAdapter | str | Path | None


def resolve_adapter(spec: AdapterSpec, model_fingerprint: str, chunk_context: str) -> ReuseAdapter | None:
    """The adapter a front end's setting names: ``"none"`` or None: none; ``"auto"``: the bundled
    adapter if it was trained for exactly this model (weights, tokenizer, dtype) and chunks are
    precomputed alone (``chunk_context="none"``), else none; ``"bundled"``, a path, or an adapter."""
    if spec is None or spec == NONE:
        return None
    if spec == AUTO:
        bundled = ReuseAdapter.load(BUNDLED)
        return bundled if chunk_context == "none" and bundled.trained_for == model_fingerprint else None
    return spec if isinstance(spec, ReuseAdapter) else ReuseAdapter.load(spec)


def adapted_fingerprint(model_fingerprint: str, adapter: ReuseAdapter | None) -> str:
    """What keys chunk KV: the model's fingerprint, with the adapter's digest hashed in when there
    is one."""
    if adapter is None:
        return model_fingerprint
    return hashlib.sha256(f"{model_fingerprint}|adapter={adapter.digest()}".encode()).hexdigest()[:32]
