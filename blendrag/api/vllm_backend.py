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
- Stats: vLLM does not report how many tokens the connector recomputed (``n_recomputed`` is
  None); whether the connector blended the prompt is read from vLLM's ``num_cached_tokens``;
  ``ttft_s`` and ``decode_s`` are vLLM's own per-request timestamps.

vLLM is imported only when the backend starts, so this module loads without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from blendrag.config import Mode
from blendrag.engine import BlendEngine
from blendrag.errors import BlendRAGError
from blendrag.vllm import blend_request

if TYPE_CHECKING:
    from vllm import RequestOutput, SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    from .rag import Ask

GIB = 1 << 30


@dataclass(frozen=True)
class VLLMGeneration:
    """A whole answer from vLLM (``backend.Finished``): the engine's ``Generation`` without the
    prefill logits, which vLLM does not hand back."""

    text: str
    token_ids: list[int]
    finish_reason: str
    stats: dict


class VLLMBackend:
    name = "vllm"
    modes: tuple[Mode, ...] = ("blend", "full")

    def __init__(self, engine: BlendEngine, store: str, kv_cache_gb: float | None = None) -> None:
        """``engine``: blendrag's engine in this process (prompt token ids, fingerprint, and the
        blend settings the connector copies). ``store``: the spec of ``engine``'s KV store, which
        vLLM's engine process opens too. ``kv_cache_gb``: vLLM's paged KV cache (None: vLLM's
        default; on the CPU build ``$VLLM_CPU_KVCACHE_SPACE``, which also overrides this value)."""
        self.check_store(store)
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
        # The connector blends exactly as this engine would: same checkpoint, store, chunk context
        # and BlendConfig (its default ratio is the one a request without recompute_ratio gets).
        extra = {
            "store": self.store,
            "model": model,
            "chunk_context": self.engine.chunk_context,
            **asdict(self.engine.config),
        }
        transfer = KVTransferConfig(
            kv_connector="BlendConnector",
            kv_connector_module_path="blendrag.vllm.connector",
            kv_role="kv_both",
            kv_connector_extra_config=extra,
        )
        return AsyncEngineArgs(
            model=model,
            # The fingerprint covers the dtype: in another dtype the connector would refuse every prompt.
            dtype=self.engine.dtype,
            enforce_eager=True,  # as the connector's tests and eval/vllm_ttft.py run it
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

    def open(self, chunks: list[str], ask: Ask) -> VLLMDecoding:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        llm = self.running_llm()
        prompt_format = self.engine.prompt_format
        extra_args: dict[str, Any] | None = None
        if ask.mode == "blend":
            request = blend_request(
                prompt_format,
                chunks,
                ask.question,
                recompute_ratio=ask.recompute_ratio,  # None: the connector's, i.e. the engine's
                fingerprint=self.engine.fingerprint,
            )
            prompt, extra_args = request.tokens_prompt(), request.extra_args()
        else:
            # "full": no chunk structure and no cache salt, so the connector passes and vLLM's
            # prefix cache shares exact KV between such prompts, never a salted blend's.
            prompt = {"prompt_token_ids": prompt_format.build(chunks, ask.question).ids}
        n_tokens, limit = len(prompt["prompt_token_ids"]), llm.model_config.max_model_len
        if n_tokens + ask.max_tokens > limit:
            raise BlendRAGError(
                f"the prompt ({n_tokens} tokens) plus max_tokens ({ask.max_tokens}) exceeds vLLM's "
                f"max_model_len ({limit}); ask for fewer chunks (top_k) or fewer tokens"
            )
        params = SamplingParams(
            max_tokens=ask.max_tokens,
            temperature=ask.temperature,
            top_p=ask.top_p,
            seed=ask.seed,
            stop=list(ask.stop),
            output_kind=RequestOutputKind.DELTA,  # each output carries only the new text
            extra_args=extra_args,
        )
        return VLLMDecoding(self, prompt, params, ask.mode, len(chunks))

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
        self.result: VLLMGeneration | None = None

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

    def next_sync(self) -> str | None:
        raise BlendRAGError("the vllm backend answers async callers only: it runs on the server's event loop")

    def close(self) -> None:
        if self._outputs is not None and self.result is None:
            self._backend.abort(self._request_id)

    def _finish(self, out: RequestOutput, finish_reason: str | None) -> VLLMGeneration:
        if finish_reason not in ("stop", "length"):
            raise RuntimeError(f"vLLM ended request {self._request_id} with {finish_reason!r}")
        n_tokens = len(self._prompt["prompt_token_ids"])
        cached = out.num_cached_tokens
        # On a hit the connector reports every prompt token but the last as computed (it only
        # takes prompts whose chunks are all stored); a fallback is vLLM's own full prefill.
        blended = self._mode == "blend" and cached is not None and cached >= n_tokens - 1
        looked_up = self._n_chunks if self._mode == "blend" else 0
        timing = out.metrics  # vLLM engine-core timestamps (None if its stats were off)
        stats = {
            "mode": self._mode,
            "n_tokens": n_tokens,
            "n_recomputed": None,  # counted by the connector inside vLLM's worker, not reported back
            "cache_hits": looked_up if blended else 0,
            "cache_misses": 0 if blended else looked_up,
            "vllm_cached_tokens": cached,
            "ttft_s": timing.first_token_ts - timing.scheduled_ts if timing else None,
            "n_generated": len(self._token_ids),
            "decode_s": timing.last_token_ts - timing.first_token_ts if timing else None,
        }
        return VLLMGeneration("".join(self._text), self._token_ids, finish_reason, stats)
