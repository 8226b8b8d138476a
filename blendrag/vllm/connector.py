"""``BlendConnector``: blendrag's blended prefill inside an unmodified vLLM, through vLLM's public
KV-connector API (``KVConnectorBase_V1``, loaded with ``kv_connector_module_path``).

Scheduler side: a request whose ``kv_transfer_params`` carry ``chunks`` and ``question`` (see
``blendrag.vllm.client``) is a hit when its prompt token ids are exactly the ids blendrag's
``PromptFormat`` builds and every chunk's KV is in the store (a lookup, no compute); then all
prompt tokens but the last are reported as externally computed. Anything else (no chunk
structure, other token ids, a store miss, another model, no cache salt while prefix caching is
on) reports 0 and vLLM prefills normally. So does a repeat of a blend whose blocks vLLM's prefix
cache still holds: vLLM computes the less-than-a-block rest itself.

Worker side: blendrag's engine computes the blended prefill (stored chunk KV, re-aligned,
selective recompute, question recomputed) and the resulting K/V is written into the request's
paged blocks with the attention backend's own cache-update op, so the backend's layout is never
guessed. vLLM then computes the last prompt token over that KV and decodes as usual.

The worker-side engine loads its own copy of the weights (blendrag's layer-by-layer model is not
vLLM's fused modules): one more copy of the model in memory
(docs/decisions/0004-vllm-connector-own-weights.md).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.model_executor.models.utils import extract_layer_index

from blendrag.config import BlendConfig
from blendrag.engine import BlendEngine, segment_key
from blendrag.errors import BlendRAGError
from blendrag.loading import inspect_checkpoint
from blendrag.prompt import PromptFormat
from blendrag.store import open_store

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConnectorConfig:
    """``kv_connector_extra_config`` keys (all optional)."""

    store: str  # directory (or file:// URL) of the KV store; shared by scheduler and worker
    model: str  # blendrag's checkpoint; default: the model vLLM serves
    blend: BlendConfig
    chunk_context: str = "none"

    @classmethod
    def from_vllm(cls, vllm_config: VllmConfig) -> ConnectorConfig:
        extra = dict(vllm_config.kv_transfer_config.kv_connector_extra_config or {})
        store = extra.pop("store", None)
        if not store or store == "memory":
            raise BlendRAGError("BlendConnector needs kv_connector_extra_config.store: a KV store directory")
        model = extra.pop("model", None) or vllm_config.model_config.model
        chunk_context = extra.pop("chunk_context", "none")
        blend = BlendConfig(**extra)  # recompute_ratio, check_layer, selector, ...; unknown keys raise
        return cls(store, model, blend, chunk_context)


@dataclass
class LoadSpec:
    """One request's blended prefill, for the worker."""

    req_id: str
    chunks: list[str]
    question: str
    blend: BlendConfig
    start: int  # first position to write (vLLM's own prefix-cache hit ends here)
    end: int  # one past the last position to write: the prompt's last token is vLLM's
    block_ids: list[int] = field(default_factory=list)


@dataclass
class BlendConnectorMetadata(KVConnectorMetadata):
    loads: list[LoadSpec] = field(default_factory=list)


class BlendConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self.cfg = ConnectorConfig.from_vllm(vllm_config)
        self.block_size = vllm_config.cache_config.block_size
        self.prefix_caching = bool(vllm_config.cache_config.enable_prefix_caching)
        dtype = vllm_config.model_config.dtype
        ckpt = inspect_checkpoint(self.cfg.model, dtype)
        served = vllm_config.model_config.model
        # KV from blendrag's model is only valid in vLLM's cache when both are the same model.
        same = served == self.cfg.model or inspect_checkpoint(served, dtype).fingerprint == ckpt.fingerprint
        self.fingerprint = ckpt.fingerprint if same else None
        if not same:
            log.error(
                "BlendConnector: model %s is not the served model %s; connector disabled", ckpt.path, served
            )
        self.prompt_format = PromptFormat(ckpt.tokenizer)
        self.store = open_store(self.cfg.store)
        self._matched: dict[str, LoadSpec] = {}  # scheduler: hits waiting for allocation
        self._pending: dict[str, LoadSpec] = {}  # scheduler: hits waiting for their blocks
        self.engine: BlendEngine | None = None
        if role == KVConnectorRole.WORKER and same:
            self.engine = BlendEngine.from_pretrained(
                self.cfg.model,
                store=self.store,
                config=self.cfg.blend,
                dtype=dtype,
                chunk_context=self.cfg.chunk_context,  # type: ignore[arg-type]
                # Load reused KV before the layer loop, not on a thread beside it: in vLLM's CPU
                # worker, whose OpenMP threads are bound to the cores, the loader thread's torch
                # ops slow the blend (docs/decisions/0003-vllm-connector-loads-kv-up-front.md).
                prefetch=False,
            )

    # ---- scheduler side ---------------------------------------------------------------------

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int, bool]:
        spec = self._match(request)
        if spec is None or self._served_before(spec, num_computed_tokens):
            self._matched.pop(request.request_id, None)
            return 0, False
        self._matched[request.request_id] = spec
        return spec.end - num_computed_tokens, False

    def _served_before(self, spec: LoadSpec, num_computed_tokens: int) -> bool:
        """vLLM's prefix cache holds every full block of the prompt: this very blend (the salt is
        unique to it) was served before. vLLM computes the rest, less than a block, exactly: far
        cheaper than blending again, and no less accurate."""
        return 0 < num_computed_tokens and spec.end < num_computed_tokens + self.block_size

    def _match(self, request: Request) -> LoadSpec | None:
        """The request's load plan when it is a full hit, else None (vLLM prefills normally)."""
        params = request.kv_transfer_params or {}
        if "chunks" not in params or self.fingerprint is None:
            return None
        try:
            chunks, question = [str(c) for c in params["chunks"]], str(params["question"])
            blend = self.cfg.blend
            if params.get("recompute_ratio") is not None:
                blend = replace(blend, recompute_ratio=float(params["recompute_ratio"]))
        except (KeyError, TypeError, ValueError) as e:
            log.warning("BlendConnector: request %s: bad kv_transfer_params (%s)", request.request_id, e)
            return None
        if params.get("fingerprint", self.fingerprint) != self.fingerprint:
            return None
        if self.prefix_caching and not request.cache_salt:
            # Blended KV is approximate: unsalted, vLLM's prefix cache would hand it to plain requests.
            return None
        prompt = self.prompt_format.build(chunks, question)
        if list(request.prompt_token_ids or []) != prompt.ids or not self._all_stored(prompt.chunks):
            return None
        return LoadSpec(request.request_id, chunks, question, blend, 0, len(prompt.ids) - 1)

    def _all_stored(self, chunk_ids: list[list[int]]) -> bool:
        context = self.prompt_format.prefix_ids if self.cfg.chunk_context == "prefix" else []
        return all(self.store.contains(segment_key(self.fingerprint, context, ids)) for ids in chunk_ids)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int):
        spec = self._matched.pop(request.request_id, None)
        if num_external_tokens == 0 or spec is None:
            return
        spec.start = spec.end - num_external_tokens
        self._pending[request.request_id] = spec

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = BlendConnectorMetadata()
        for req in scheduler_output.scheduled_new_reqs:
            if (spec := self._pending.pop(req.req_id, None)) is not None:
                spec.block_ids = list(req.block_ids[0])
                meta.loads.append(spec)
        cached = scheduler_output.scheduled_cached_reqs
        for req_id, block_ids in zip(cached.req_ids, cached.new_block_ids, strict=True):
            # A preempted request resumes with all its blocks listed anew.
            if req_id in cached.resumed_req_ids and (spec := self._pending.pop(req_id, None)) is not None:
                assert block_ids is not None
                spec.block_ids = list(block_ids[0])
                meta.loads.append(spec)
        return meta

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._matched.pop(request.request_id, None)
        self._pending.pop(request.request_id, None)
        return False, None

    # ---- worker side ------------------------------------------------------------------------

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, BlendConnectorMetadata)
        if not meta.loads:
            return
        assert self.engine is not None
        layers = {
            extract_layer_index(name): layer
            for name, layer in forward_context.no_compile_layers.items()
            if hasattr(layer, "impl") and getattr(layer, "kv_cache", None) is not None
        }
        for spec in meta.loads:
            self._load(spec, layers)

    @torch.inference_mode()
    def _load(self, spec: LoadSpec, layers: dict[int, torch.nn.Module]) -> None:
        pre = self.engine.prefill(spec.chunks, spec.question, mode="blend", config=spec.blend)
        positions = torch.arange(spec.start, spec.end)
        blocks = torch.tensor(spec.block_ids)
        slots = blocks[positions // self.block_size] * self.block_size + positions % self.block_size
        for i, layer in layers.items():
            # KVBuffer is [layers, kv_heads, positions, head_dim]; the cache op takes [tokens, heads, dim].
            k = pre.kv.k[i, :, spec.start : spec.end].transpose(0, 1).contiguous()
            v = pre.kv.v[i, :, spec.start : spec.end].transpose(0, 1).contiguous()
            layer.impl.do_kv_cache_update(layer, k, v, layer.kv_cache, slots)
        log.info(
            "BlendConnector: request %s: wrote %d blended tokens (%d recomputed, %.2f s)",
            spec.req_id,
            spec.end - spec.start,
            pre.stats.n_recomputed,
            pre.stats.ttft_s,
        )

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # start_load_kv writes every layer before the forward pass

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: AttentionMetadata, **kwargs: Any
    ) -> None:
        return  # chunks are precomputed by blendrag (``blendrag index`` / ``BlendEngine.precompute``)

    def wait_for_save(self) -> None:
        return
