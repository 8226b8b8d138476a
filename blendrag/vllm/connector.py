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

The worker-side engine runs on vLLM's device in vLLM's dtype and loads its own copy of the weights
(blendrag's layer-by-layer model is not vLLM's fused modules): one more copy of the model in
memory, which the worker logs (docs/decisions/0004-vllm-connector-own-weights.md). Under tensor
parallelism every worker blends all heads and writes the KV heads its cache shard holds.

A blend that fails (an unreadable store entry, any error) does not fail the step: the worker logs
it and reports the request's blocks through ``get_block_ids_with_load_errors``, and vLLM, with
``kv_load_failure_policy="recompute"``, prefills the prompt itself. Per request, the worker's
counts travel back to the scheduler (``build_connector_worker_meta``) and reach the client in
``RequestOutput.kv_transfer_params`` (``blendrag.vllm.client.blend_report``); aggregated counts
go to vLLM's connector stats (``BlendConnectorStats``).
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
    KVConnectorWorkerMetadata,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats
from vllm.distributed.parallel_state import get_pp_group, get_tp_group
from vllm.model_executor.models.utils import extract_layer_index

from blendrag.adapter import AUTO, adapted_fingerprint, resolve_adapter
from blendrag.chunk_kv import ChunkKVCache
from blendrag.config import BlendConfig
from blendrag.engine import BlendEngine
from blendrag.errors import BlendRAGError
from blendrag.kvbuffer import KVBuffer
from blendrag.loading import inspect_checkpoint
from blendrag.prompt import PromptFormat
from blendrag.store import open_store
from blendrag.store.formats import DEFAULT_FORMAT, get_format
from blendrag.vllm.client import BlendReport

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

    from blendrag.adapter import ReuseAdapter

# Under vLLM's logger, so that vLLM's handler and level (VLLM_LOGGING_LEVEL) apply to it.
log = logging.getLogger("vllm.blendrag.connector")


@dataclass(frozen=True)
class ConnectorConfig:
    """``kv_connector_extra_config`` keys (all optional)."""

    store: str  # directory (or file:// URL) of the KV store; shared by scheduler and worker
    model: str  # blendrag's checkpoint; default: the model vLLM serves
    blend: BlendConfig
    chunk_context: str = "none"
    kv_format: str = DEFAULT_FORMAT  # the store's chunk KV format (blendrag.store.formats)
    adapter: str = AUTO  # the reuse adapter chunks were precomputed after (blendrag.adapter)

    @classmethod
    def from_vllm(cls, vllm_config: VllmConfig) -> ConnectorConfig:
        extra = dict(vllm_config.kv_transfer_config.kv_connector_extra_config or {})
        store = extra.pop("store", None)
        if not store or store == "memory":
            raise BlendRAGError("BlendConnector needs kv_connector_extra_config.store: a KV store directory")
        model = extra.pop("model", None) or vllm_config.model_config.model
        chunk_context = extra.pop("chunk_context", "none")
        kv_format = get_format(extra.pop("kv_format", DEFAULT_FORMAT)).tag
        adapter = str(extra.pop("adapter", AUTO))
        blend = BlendConfig(**extra)  # recompute_ratio, check_layer, selector, ...; unknown keys raise
        return cls(store, model, blend, chunk_context, kv_format, adapter)


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

    def written_blocks(self, block_size: int) -> list[int]:
        """The blocks holding positions [start, end)."""
        return self.block_ids[self.start // block_size : (self.end + block_size - 1) // block_size]


@dataclass
class BlendConnectorMetadata(KVConnectorMetadata):
    loads: list[LoadSpec] = field(default_factory=list)


@dataclass
class BlendWorkerMeta(KVConnectorWorkerMetadata):
    """Worker -> scheduler, per step: the report of each request the step loaded."""

    reports: dict[str, BlendReport] = field(default_factory=dict)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        assert isinstance(other, BlendWorkerMeta)
        return BlendWorkerMeta({**self.reports, **other.reports})


@dataclass
class BlendConnectorStats(KVConnectorStats):
    """Counters over an interval, summed: the scheduler's ``hits`` (loads planned) and ``misses``
    (requests with chunk structure left to vLLM), the worker's ``blended`` requests,
    ``tokens_written``, ``tokens_recomputed`` and ``load_errors``."""

    def add(self, **counts: int) -> None:
        for name, n in counts.items():
            self.data[name] = self.data.get(name, 0) + n

    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        self.add(**other.data)
        return self

    def reduce(self) -> dict[str, int | float]:
        return dict(self.data)

    def is_empty(self) -> bool:
        return not any(self.data.values())


def kv_head_shard(n_kv_heads: int, tp_size: int, rank: int) -> slice:
    """The KV heads that tensor-parallel rank ``rank`` of ``tp_size`` holds, as vLLM's
    ``QKVParallelLinear`` shards them: ``n_kv_heads / tp_size`` consecutive heads per rank, or,
    with fewer heads than ranks, one head replicated on ``tp_size / n_kv_heads`` consecutive ranks."""
    if not 0 <= rank < tp_size:
        raise ValueError(f"rank {rank} is not in [0, {tp_size})")
    if n_kv_heads >= tp_size:
        if n_kv_heads % tp_size:
            raise ValueError(f"{n_kv_heads} KV heads do not split over {tp_size} ranks")
        width = n_kv_heads // tp_size
        return slice(rank * width, (rank + 1) * width)
    if tp_size % n_kv_heads:
        raise ValueError(f"{tp_size} ranks do not replicate {n_kv_heads} KV heads evenly")
    head = rank // (tp_size // n_kv_heads)
    return slice(head, head + 1)


def worker_device(vllm_config: VllmConfig) -> torch.device:
    """The device vLLM's worker computes on. ``device_config.device`` holds only its type ("cuda";
    None where vLLM keeps inputs on the host): the worker made its own device (``cuda:<local
    rank>``) current before it created the connector."""
    device = vllm_config.device_config.device
    if device is None:
        return torch.device("cpu")
    device = torch.device(device)
    if device.type == "cpu" or device.index is not None:
        return device
    return torch.device(device.type, getattr(torch, device.type).current_device())


def write_kv(kv: KVBuffer, spec: LoadSpec, layers: dict[int, Any], block_size: int, heads: slice) -> None:
    """Write positions [start, end) of ``kv``'s heads ``heads`` into each layer's paged cache, with
    the attention backend's own cache-update op, on the cache's device."""
    device = next(iter(layers.values())).kv_cache.device  # a worker's caches share its device
    positions = torch.arange(spec.start, spec.end, device=device)
    blocks = torch.tensor(spec.block_ids, device=device)
    slots = blocks[positions // block_size] * block_size + positions % block_size
    for i, layer in layers.items():
        if layer.num_kv_heads != heads.stop - heads.start:
            raise BlendRAGError(f"layer {i} holds {layer.num_kv_heads} KV heads, the shard {heads}")
        # KVBuffer is [layers, kv_heads, positions, head_dim]; the cache op takes [tokens, heads, dim].
        k = kv.k[i, heads, spec.start : spec.end].transpose(0, 1).contiguous().to(device)
        v = kv.v[i, heads, spec.start : spec.end].transpose(0, 1).contiguous().to(device)
        layer.impl.do_kv_cache_update(layer, k, v, layer.kv_cache, slots)


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
        # Chunk KV is keyed by the model and the reuse adapter it was precomputed after.
        adapter = resolve_adapter(self.cfg.adapter, ckpt.fingerprint, self.cfg.chunk_context)
        chunk_fingerprint = adapted_fingerprint(ckpt.fingerprint, adapter)
        self.fingerprint = chunk_fingerprint if same else None
        if not same:
            log.error(
                "BlendConnector: model %s is not the served model %s; connector disabled", ckpt.path, served
            )
        self.prompt_format = PromptFormat(ckpt.tokenizer)
        self.store = open_store(self.cfg.store)
        # scheduler: which chunks are stored (the keys the worker's engine uses; no model here)
        self.chunk_kv = ChunkKVCache(
            self.store,
            chunk_fingerprint,
            self.prompt_format,
            get_format(self.cfg.kv_format),
            self.cfg.chunk_context,  # type: ignore[arg-type]
        )
        self._stats = BlendConnectorStats()
        # scheduler: each waiting request's match, computed once (None: vLLM prefills it) ...
        self._plans: dict[str, LoadSpec | None] = {}
        self._pending: dict[str, LoadSpec] = {}  # ... hits waiting for their blocks
        self._reports: dict[str, BlendReport] = {}  # ... and the worker's reports until they finish
        # worker: this step's failed blocks and reports; whether this worker counts and reports
        self._failed_blocks: set[int] = set()
        self._step_reports: dict[str, BlendReport] = {}
        self.reporting = True
        self.engine: BlendEngine | None = None
        policy = vllm_config.kv_transfer_config.kv_load_failure_policy
        if role == KVConnectorRole.SCHEDULER and policy == "fail":
            log.warning(
                "BlendConnector: kv_load_failure_policy is 'fail': a request whose blend fails ends "
                "with an error; with 'recompute' vLLM prefills it instead"
            )
        if role == KVConnectorRole.WORKER and same:
            self._init_worker(vllm_config, dtype, adapter)

    def _init_worker(self, vllm_config: VllmConfig, dtype: torch.dtype, adapter: ReuseAdapter | None) -> None:
        device = worker_device(vllm_config)
        self.engine = BlendEngine.from_pretrained(
            self.cfg.model,
            store=self.store,
            config=self.cfg.blend,
            device=device,
            dtype=dtype,
            chunk_context=self.cfg.chunk_context,  # type: ignore[arg-type]
            kv_format=self.cfg.kv_format,
            adapter=adapter,
            # Load reused KV before the layer loop, not on a thread beside it: in vLLM's CPU
            # worker, whose OpenMP threads are bound to the cores, the loader thread's torch
            # ops slow the blend (docs/decisions/0003-vllm-connector-loads-kv-up-front.md).
            prefetch=False,
        )
        tp, pp = get_tp_group(), get_pp_group()
        self.heads = kv_head_shard(self.engine.model.args.n_kv_heads, tp.world_size, tp.rank_in_group)
        # Every worker blends the same requests: one of them reports, so that nothing counts twice.
        self.reporting = tp.rank_in_group == 0 and pp.is_first_rank
        nbytes = sum(p.numel() * p.element_size() for p in self.engine.model.parameters())
        log.info(
            "BlendConnector: blendrag's own copy of the weights: %.2f GB of parameters (%s) on %s",
            nbytes / 1e9,
            dtype,
            device,
        )

    # ---- scheduler side ---------------------------------------------------------------------

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int, bool]:
        # vLLM asks again each step a request waits: tokenizing and store lookups happen once.
        if request.request_id not in self._plans:
            self._plans[request.request_id] = plan = self._match(request)
            if plan is None and "chunks" in (request.kv_transfer_params or {}):
                self._count(misses=1)
        spec = self._plans[request.request_id]
        if spec is None or self._served_before(spec, num_computed_tokens):
            return 0, False
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
        if list(request.prompt_token_ids or []) != prompt.ids or not self.chunk_kv.all_stored(prompt.chunks):
            return None
        return LoadSpec(request.request_id, chunks, question, blend, 0, len(prompt.ids) - 1)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int):
        plan = self._plans.get(request.request_id)
        if num_external_tokens == 0 or plan is None:
            return
        self._pending[request.request_id] = replace(plan, start=plan.end - num_external_tokens)
        self._count(hits=1)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = BlendConnectorMetadata()
        for req in scheduler_output.scheduled_new_reqs:
            if (spec := self._pending.pop(req.req_id, None)) is not None:
                meta.loads.append(replace(spec, block_ids=list(req.block_ids[0])))
        cached = scheduler_output.scheduled_cached_reqs
        for req_id, block_ids in zip(cached.req_ids, cached.new_block_ids, strict=True):
            # A preempted request resumes with all its blocks listed anew.
            if req_id in cached.resumed_req_ids and (spec := self._pending.pop(req_id, None)) is not None:
                assert block_ids is not None
                meta.loads.append(replace(spec, block_ids=list(block_ids[0])))
        return meta

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        meta = connector_output.kv_connector_worker_meta
        if not isinstance(meta, BlendWorkerMeta):
            return
        for req_id, report in meta.reports.items():
            if req_id in self._plans:  # else it finished in the step that blended it: no one to tell
                self._reports[req_id] = report

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._plans.pop(request.request_id, None)
        self._pending.pop(request.request_id, None)
        report = self._reports.pop(request.request_id, None)
        return False, None if report is None else report.to_params()

    # ---- both sides -------------------------------------------------------------------------

    def _count(self, **counts: int) -> None:
        if self.reporting:
            self._stats.add(**counts)

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        if self._stats.is_empty():
            return None
        stats, self._stats = self._stats, BlendConnectorStats()
        return stats

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats | None:
        return BlendConnectorStats(data=dict(data or {}))

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
        reports = {}
        for spec in meta.loads:
            try:
                reports[spec.req_id] = self._load(spec, layers)
            except Exception as err:  # whatever failed, vLLM recomputes the request: the step goes on
                log.error(
                    "BlendConnector: request %s: blend failed, vLLM recomputes its prompt: %s",
                    spec.req_id,
                    err,
                    exc_info=True,
                )
                self._failed_blocks.update(spec.written_blocks(self.block_size))
                reports[spec.req_id] = BlendReport(error=f"{type(err).__name__}: {err}")
                self._count(load_errors=1)
        self._step_reports = reports if self.reporting else {}

    @torch.inference_mode()
    def _load(self, spec: LoadSpec, layers: dict[int, Any]) -> BlendReport:
        pre = self.engine.prefill(spec.chunks, spec.question, mode="blend", config=spec.blend)
        write_kv(pre.kv, spec, layers, self.block_size, self.heads)
        stats, n_written = pre.stats, spec.end - spec.start
        self._count(blended=1, tokens_written=n_written, tokens_recomputed=stats.n_recomputed)
        log.info(
            "BlendConnector: request %s: wrote %d blended tokens (%d recomputed, %.2f s)",
            spec.req_id,
            n_written,
            stats.n_recomputed,
            stats.ttft_s,
        )
        return BlendReport(
            n_written=n_written,
            n_recomputed=stats.n_recomputed,
            compute_fraction=stats.compute_fraction,
            cache_hits=stats.cache_hits,
            cache_misses=stats.cache_misses,
            load_stall_s=stats.load_stall_s,
            blend_s=stats.ttft_s,
        )

    def get_block_ids_with_load_errors(self) -> set[int]:
        # Sync loading: reported in the step that failed (this one), then forgotten.
        failed, self._failed_blocks = self._failed_blocks, set()
        return failed

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        reports, self._step_reports = self._step_reports, {}
        return BlendWorkerMeta(reports) if reports else None

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # start_load_kv writes every layer before the forward pass

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: AttentionMetadata, **kwargs: Any
    ) -> None:
        return  # chunks are precomputed by blendrag (``blendrag index`` / ``BlendEngine.precompute``)

    def wait_for_save(self) -> None:
        return
