"""``VLLMBackend``: answers prefilled and decoded by an in-process vLLM (``blendrag serve --backend
vllm``), vLLM's ``AsyncLLM`` with blendrag's ``BlendConnector`` on the index's KV store.

What changes against the engine backend (``backend.EngineBackend``):

- vLLM schedules and batches concurrent answers itself (continuous batching) in its own engine
  process; the server's ``ComputeWorker`` only retrieves and indexes.
- ``blend`` is sent as blendrag's token ids with the chunk structure (``blend_request``): the
  connector writes blendrag's blend into vLLM's paged cache at the request's ratio, and vLLM
  computes the last prompt token and decodes. ``full`` sends the same ids without chunk structure,
  so vLLM prefills them itself. ``reuse`` and ``prefix`` are modes of blendrag's own prefill that
  the connector does not run: ``RAGService`` refuses them with a 400.
- Stats (``VLLMStats``, the engine's ``GenerationStats`` and vLLM's ``num_cached_tokens``): the
  connector's report (``blend_report``: tokens recomputed, compute share, load stall, chunk hits)
  when vLLM hands it back; without one (a fallback, or an answer that ended before the report
  reached vLLM's scheduler) those are None and whether the connector blended the prompt is read
  from ``num_cached_tokens``; ``ttft_s`` and ``decode_s`` are vLLM's own per-request timestamps.
- A request's ``blend`` may differ from the engine's ``BlendConfig`` in its ratio only: the
  connector runs the engine's settings, and takes a ratio per request.

vLLM is imported only when the backend starts, so this module loads without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

from blendrag.config import Mode
from blendrag.engine import BlendEngine, Generation
from blendrag.errors import BlendRAGError
from blendrag.request import RAGRequest
from blendrag.stats import GenerationStats
from blendrag.vllm import blend_request
from blendrag.vllm.client import BlendReport, blend_report

if TYPE_CHECKING:
    from vllm import RequestOutput, SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

GIB = 1 << 30


@dataclass(frozen=True)
class VLLMStats(GenerationStats):
    vllm_cached_tokens: int | None  # prompt tokens vLLM did not compute itself


class VLLMBackend:
    name = "vllm"
    modes: tuple[Mode, ...] = ("blend", "full")

    def __init__(self, engine: BlendEngine, store: str, kv_cache_gb: float | None = None) -> None:
        """``engine``: blendrag's engine in this process (prompt token ids, fingerprint, and the
        blend settings the connector copies). ``store``: the spec of ``engine``'s KV store, which
        vLLM's engine process opens too. ``kv_cache_gb``: vLLM's paged KV cache (None: vLLM's
        default; on the CPU build ``$VLLM_CPU_KVCACHE_SPACE``, which also overrides this value)."""
        self.check_store(store)
        if engine.adapter is not None and engine.adapter.path is None:
            raise BlendRAGError(
                "the vllm backend loads the reuse adapter from its file: save it and load that"
            )
        self.engine, self.store, self.kv_cache_gb = engine, store, kv_cache_gb
        self._llm: AsyncLLM | None = None
        self._aborts: set[asyncio.Task] = set()  # held so that a pending abort is not collected

    @staticmethod
    def check_store(store: str | None) -> None:
        if store is None or store == "memory":
            raise BlendRAGError(
                "the vllm backend needs a KV store that vLLM's engine process can open too: "
                "a directory, file:// or redis:// URL, not 'memory'"
            )

    def engine_args(self) -> AsyncEngineArgs:
        from vllm.config import KVTransferConfig
        from vllm.engine.arg_utils import AsyncEngineArgs

        model = str(self.engine.model_path)
        # The connector blends exactly as this engine would: same checkpoint, store, chunk context,
        # reuse adapter and BlendConfig (its default ratio is the one a request without
        # recompute_ratio gets).
        adapter = self.engine.adapter
        extra = {
            "store": self.store,
            "model": model,
            "chunk_context": self.engine.chunk_context,
            "kv_format": self.engine.kv_format.tag,
            "adapter": "none" if adapter is None else str(adapter.path),
            **asdict(self.engine.config),
        }
        transfer = KVTransferConfig(
            kv_connector="BlendConnector",
            kv_connector_module_path="blendrag.vllm.connector",
            kv_role="kv_both",
            kv_connector_extra_config=extra,
            kv_load_failure_policy="recompute",  # a failed blend: vLLM prefills the prompt itself
        )
        return AsyncEngineArgs(
            model=model,
            # The fingerprint covers the dtype: in another dtype the connector would refuse every prompt.
            dtype=self.engine.dtype,
            enforce_eager=True,  # as the connector's tests and bench/vllm_ttft.py run it
            kv_transfer_config=transfer,
            kv_cache_memory_bytes=None if self.kv_cache_gb is None else int(self.kv_cache_gb * GIB),
            disable_log_stats=False,  # per-request timestamps: the answer's ttft_s and decode_s
        )

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        from vllm.v1.engine.async_llm import AsyncLLM

        # Started on the server's event loop, which AsyncLLM's output handler binds to. The start
        # blocks the loop (about a minute on CPU), as in vLLM's own server: nothing is served yet.
        self._llm = AsyncLLM.from_engine_args(self.engine_args())
        try:
            yield
        finally:
            llm, self._llm = self._llm, None
            llm.shutdown()

    def open(self, chunks: list[str], request: RAGRequest) -> VLLMDecoding:
        sampling = request.sampling
        # The engine's length check, before vLLM sees the request (vLLM's max_model_len is the
        # same config's max_position_embeddings).
        ids = self.engine.build_prompt(chunks, request.question, sampling.max_new_tokens).ids
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        extra_args: dict[str, Any] | None = None
        if request.mode == "blend":
            blend = blend_request(
                self.engine.prompt_format,
                chunks,
                request.question,
                recompute_ratio=self._ratio(request),
                fingerprint=self.engine.fingerprint,
            )
            prompt, extra_args = blend.tokens_prompt(), blend.extra_args()
        else:
            # "full": no chunk structure and no cache salt, so the connector passes and vLLM's
            # prefix cache shares exact KV between such prompts, never a salted blend's.
            prompt = {"prompt_token_ids": ids}
        params = SamplingParams(
            max_tokens=sampling.max_new_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            seed=sampling.seed,
            stop=list(sampling.stop),
            output_kind=RequestOutputKind.DELTA,  # each output carries only the new text
            extra_args=extra_args,
        )
        return VLLMDecoding(self, prompt, params, request.mode, len(chunks))

    def _ratio(self, request: RAGRequest) -> float | None:
        """The ratio the connector is sent (None: its own, i.e. the engine's)."""
        if request.blend is None:
            return None
        engine_config = self.engine.config
        if replace(request.blend, recompute_ratio=engine_config.recompute_ratio) != engine_config:
            raise BlendRAGError(
                "the vllm backend blends with the server's BlendConfig; a request may set its ratio only"
            )
        return request.blend.recompute_ratio

    def running_llm(self) -> AsyncLLM:
        """vLLM's engine, while the server runs."""
        if self._llm is None:
            raise RuntimeError("the vllm backend is not running: serve the app (its lifespan starts vLLM)")
        return self._llm

    def abort(self, request_id: str) -> None:
        """Abort a request without waiting (``Decoding.close`` must not block)."""
        if self._llm is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop left: vLLM aborts the request when its output generator is collected
        task = loop.create_task(self._llm.abort(request_id))
        self._aborts.add(task)
        task.add_done_callback(self._aborts.discard)


class VLLMDecoding:
    """One request in vLLM; the first ``next`` submits it."""

    def __init__(
        self, backend: VLLMBackend, prompt: dict[str, Any], params: SamplingParams, mode: Mode, n_chunks: int
    ) -> None:
        self._backend, self._prompt, self._params = backend, prompt, params
        self._mode, self._n_chunks = mode, n_chunks
        self._request_id = uuid.uuid4().hex
        self._outputs: AsyncGenerator[RequestOutput, None] | None = None
        self._text: list[str] = []
        self._token_ids: list[int] = []
        self.result: Generation | None = None

    async def next(self) -> str | None:
        from vllm.exceptions import VLLMClientError

        while self.result is None:
            try:
                if self._outputs is None:
                    self._outputs = await self._submit()
                out = await anext(self._outputs)
            except VLLMClientError as err:  # vLLM's validation: the caller's request, not a fault
                raise BlendRAGError(f"vLLM refused the request: {err}") from err
            completion = out.outputs[0]
            self._text.append(completion.text)
            self._token_ids.extend(completion.token_ids)
            if out.finished:
                self.result = self._finish(out, completion.finish_reason)
            if completion.text:
                return completion.text
        return None

    async def _submit(self) -> AsyncGenerator[RequestOutput, None]:
        llm = self._backend.running_llm()
        # Rendered first, as AsyncLLM.generate asks (a raw prompt is deprecated there); the token
        # ids pass through unchanged and the cache salt is kept.
        (engine_input,) = await llm.renderer.render_cmpl_async([self._prompt])
        return llm.generate(engine_input, self._params, self._request_id)

    def close(self) -> None:
        if self._outputs is not None and self.result is None:
            self._backend.abort(self._request_id)

    def _finish(self, out: RequestOutput, finish_reason: str | None) -> Generation:
        if finish_reason not in ("stop", "length"):
            raise RuntimeError(f"vLLM ended request {self._request_id} with {finish_reason!r}")
        n_tokens = len(self._prompt["prompt_token_ids"])
        cached = out.num_cached_tokens
        looked_up = self._n_chunks if self._mode == "blend" else 0
        report = blend_report(out.kv_transfer_params)
        if report is None:
            # On a hit the connector reports every prompt token but the last as computed (it only
            # takes prompts whose chunks are all stored); a fallback is vLLM's own full prefill.
            blended = self._mode == "blend" and cached is not None and cached >= n_tokens - 1
            hits = looked_up if blended else 0
            report = BlendReport(cache_hits=hits, cache_misses=looked_up - hits)
        elif report.error is not None:  # the blend failed: vLLM prefilled the prompt itself
            report = BlendReport(cache_misses=looked_up)
        timing = out.metrics  # vLLM engine-core timestamps (None if its stats were off)
        stats = VLLMStats(
            mode=self._mode,
            n_tokens=n_tokens,
            n_recomputed=report.n_recomputed,
            compute_fraction=report.compute_fraction,
            cache_hits=report.cache_hits,
            cache_misses=report.cache_misses,
            load_stall_s=report.load_stall_s,
            ttft_s=timing.first_token_ts - timing.scheduled_ts if timing else None,
            n_generated=len(self._token_ids),
            decode_s=timing.last_token_ts - timing.first_token_ts if timing else None,
            vllm_cached_tokens=cached,
        )
        return Generation("".join(self._text), self._token_ids, stats, finish_reason)
