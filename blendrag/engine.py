"""``BlendEngine``: the four prefill modes over stored chunk KV, and decoding.

Chunk KV ("segments") is computed once, by this engine's model, and kept in a ``KVStore``
(``blendrag.chunk_kv``: keys, lookups). ``chunk_context="none"`` (the default) prefills each
chunk alone from position 0; ``"prefix"`` prefills it right after the prompt prefix (system
prompt + instruction), which makes the first chunk of a prompt exact (same tokens, positions and
context as a full prefill) and gives the fused prompt one attention sink: without a reuse adapter,
blend is closer to full prefill so (docs/decisions/0002-chunk-context-none.md). The prefix itself
is a segment with an empty context.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import torch
from torch.profiler import record_function

from .adapter import AUTO, AdapterSpec, ReuseAdapter, adapted_fingerprint, resolve_adapter
from .chunk_kv import ChunkContext, ChunkKVCache
from .config import MODES, BlendConfig, Mode
from .errors import BlendRAGError, CorruptEntry
from .forward import Filter, append_tokens, run_layers
from .kvbuffer import KVBuffer
from .loading import LoadedModel, blendrag_home, load_model
from .offset import OffsetCorrection
from .prompt import PromptFormat, RAGPrompt
from .request import DEFAULT_MAX_NEW_TOKENS, MAX_QUESTION_CHARS, PromptLimits
from .rope import Rotary
from .sampling import Detokenizer, Sampler, SamplingParams
from .selection import plan_selection, preview_attention
from .stats import GenerationStats, PrefillStats
from .store import KVStore, open_store
from .store.base import ChunkKV
from .store.formats import DEFAULT_FORMAT, KVFormat, get_format


@dataclass
class PrefillPlan:
    """What a prefill computes over the KV it loaded: ``positions`` run from layer 0, ``filters``
    narrow them at later layers (blend's check layers), ``scores`` ranked the chunk tokens before
    the pass (the preview's attention, or the caller's), ``correction`` changes the reused KV of
    the tokens not computed (offset correction)."""

    positions: torch.Tensor
    filters: dict[int, Filter] = field(default_factory=dict)
    scores: torch.Tensor | None = None
    correction: OffsetCorrection | None = None


@dataclass
class Prefill:
    logits: torch.Tensor  # next-token logits at the last prompt position, [vocab], fp32
    stats: PrefillStats
    prompt: RAGPrompt
    kv: KVBuffer = field(repr=False)
    plan: PrefillPlan = field(repr=False)
    recomputed: torch.Tensor = field(repr=False)  # the positions computed at the last layer


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    stats: GenerationStats
    finish_reason: str  # "stop" (EOS or stop string) or "length"
    # The prefill's logits, for quality metrics; None from a backend that does not hand them back (vLLM).
    first_logits: torch.Tensor | None = field(default=None, repr=False)


class GenerationStream:
    """Iterate for text pieces; ``result`` holds the ``Generation`` once iteration ends."""

    def __init__(self, pieces: Iterator[str | Generation]) -> None:
        self._pieces = pieces
        self.result: Generation | None = None

    def __iter__(self) -> Iterator[str]:
        for item in self._pieces:
            if isinstance(item, Generation):
                self.result = item
            elif item:
                yield item

    def close(self) -> None:
        """Stop decoding early and free the request's state (its KV buffer)."""
        self._pieces.close()


class BlendEngine:
    def __init__(
        self,
        loaded: LoadedModel,
        store: KVStore,
        config: BlendConfig | None = None,
        prompt_format: PromptFormat | None = None,
        chunk_context: ChunkContext = "none",
        prefetch: bool = True,
        max_question_chars: int = MAX_QUESTION_CHARS,
        kv_format: str = DEFAULT_FORMAT,
        adapter: ReuseAdapter | None = None,
    ) -> None:
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.model_fingerprint = loaded.fingerprint  # the weights alone: what full prefill depends on
        self.adapter = _attach_adapter(adapter, loaded.model, chunk_context)
        # What chunk KV depends on, and what keys it: the weights and the adapter.
        self.fingerprint = adapted_fingerprint(loaded.fingerprint, self.adapter)
        self.model_path = loaded.path
        self.config = config or BlendConfig()
        self.prompt_format = prompt_format or PromptFormat(self.tokenizer)
        # Chunk KV: keys, lookups, and this engine's model computing what is missing.
        self.chunk_kv = ChunkKVCache(
            store,
            self.fingerprint,
            self.prompt_format,
            get_format(kv_format),
            chunk_context,
            self._compute_segment,
        )
        self.prefetch = prefetch  # load reused KV layer by layer while computing (BlendEngine.prefill)
        self.rotary = Rotary(loaded.config, self.model.args.head_dim)
        weight = next(self.model.parameters())
        self.dtype, self.device = weight.dtype, weight.device  # every tensor the engine makes
        self.eos_ids = _eos_ids(loaded)
        self.limits = PromptLimits(loaded.config.max_position_embeddings, max_question_chars)

    @classmethod
    def from_pretrained(
        cls,
        path: str | None = None,
        *,
        store: KVStore | str | None = None,
        config: BlendConfig | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        threads: int | None = None,
        chunk_context: ChunkContext = "none",
        prompt_format: PromptFormat | None = None,
        prefetch: bool = True,
        max_question_chars: int = MAX_QUESTION_CHARS,
        kv_format: str = DEFAULT_FORMAT,
        adapter: AdapterSpec = AUTO,
    ) -> BlendEngine:
        """Load a Llama-family checkpoint (default: the embedded SmolLM2-135M-Instruct).

        ``store`` is a ``KVStore`` or a spec for ``open_store`` (None: memory in front of
        ``$BLENDRAG_HOME/kv``). ``device``: default CUDA when available, else CPU; ``dtype`` (a
        ``torch.dtype`` or its name): default bf16 on CUDA, fp32 on CPU. Stored KV stays in the
        store (host memory, disk or Redis) and is copied to the device per request.
        ``max_question_chars``: the longest question a prompt may hold (``limits``, which every
        front end's request is checked against). ``kv_format``: how chunk KV is stored
        (``blendrag.store.formats``: fp32, bf16, fp16, int8, fp8, cachegen). ``adapter``: the
        reuse adapter chunks are precomputed after (``blendrag.adapter.resolve_adapter``):
        "auto" (the bundled adapter for the bundled model, else none), "none" or None,
        "bundled", the path of one saved by ``blendrag tune``, or a ``ReuseAdapter``."""
        if threads is not None:
            torch.set_num_threads(threads)
        if store is None or isinstance(store, str):
            store = open_store(store or str(blendrag_home() / "kv"))
        device, dtype = resolve_device(device, dtype)
        try:
            get_format(kv_format)
        except ValueError as err:
            raise BlendRAGError(str(err)) from None
        loaded = load_model(path, dtype)
        loaded.model.to(device)
        adapter = resolve_adapter(adapter, loaded.fingerprint, chunk_context)
        pf = prompt_format or PromptFormat(loaded.tokenizer)
        return cls(loaded, store, config, pf, chunk_context, prefetch, max_question_chars, kv_format, adapter)

    def _arange(self, start: int, end: int) -> torch.Tensor:
        return torch.arange(start, end, device=self.device)

    def _ids(self, ids: list[int]) -> torch.Tensor:
        return torch.tensor(ids, dtype=torch.long, device=self.device)

    # ---- chunk KV -------------------------------------------------------------------------

    @torch.inference_mode()
    def _compute_segment(self, context: list[int], ids: list[int]) -> ChunkKV:
        if self.adapter is not None and not self.chunk_kv.is_prefix(context, ids):
            k, v = self.adapter.segment_kv(self.model, self.rotary, self._ids(ids))
        else:
            k, v = self._segment_kv(context, ids)
        # Stored KV lives on the host: the store outlasts any one device buffer. It is quantized
        # here, once, so every tier holds (and every prompt reads) the same values.
        fmt = self.chunk_kv.segment_format(context, ids)
        k, v = fmt.quantize(k.cpu(), v.cpu())
        return ChunkKV(k, v, fmt.tag)

    def _segment_kv(self, context: list[int], ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The un-rotated K and V ``[n_layers, n_kv_heads, n, head_dim]`` of ``ids`` after ``context``."""
        buf = KVBuffer(self.model.args, len(context) + len(ids), self.dtype, self.device)
        if context:
            buf.load([(0, self.chunk_kv.segments([], [context])[0][0])], self.rotary)
        buf.length = len(context) + len(ids)
        positions = self._arange(len(context), buf.length)
        out = run_layers(
            self.model, self.rotary, buf, self._ids(ids), positions, capture=True, last_row_only=True
        )
        return torch.stack(out.captured_k), torch.stack(out.captured_v)

    def precompute(self, texts: list[str]) -> int:
        """Compute and store the KV of every chunk not yet in the store; returns how many."""
        return self.chunk_kv.precompute(texts)

    @property
    def store(self) -> KVStore:
        return self.chunk_kv.store

    @property
    def kv_format(self) -> KVFormat:
        return self.chunk_kv.kv_format

    @property
    def chunk_context(self) -> ChunkContext:
        return self.chunk_kv.chunk_context

    def with_store(self, store: KVStore) -> BlendEngine:
        """This engine (the same model, weights and settings) over another KV store."""
        view = copy.copy(self)
        view.chunk_kv = replace(self.chunk_kv, store=store, compute=view._compute_segment)
        return view

    def with_adapter(self, adapter: ReuseAdapter | None) -> BlendEngine:
        """This engine (the same model, store and settings) with chunks precomputed after
        ``adapter`` (None: alone); its chunk KV is keyed apart from this engine's."""
        view = copy.copy(self)
        view.adapter = _attach_adapter(adapter, self.model, self.chunk_context)
        view.fingerprint = adapted_fingerprint(self.model_fingerprint, view.adapter)
        view.chunk_kv = replace(self.chunk_kv, fingerprint=view.fingerprint, compute=view._compute_segment)
        return view

    # ---- prefill ----------------------------------------------------------------------------

    def _resolve_config(self, recompute_ratio: float | None, config: BlendConfig | None) -> BlendConfig:
        cfg = config or self.config
        return cfg if recompute_ratio is None else replace(cfg, recompute_ratio=recompute_ratio)

    def build_prompt(self, chunks: list[str], question: str, max_new_tokens: int = 0) -> RAGPrompt:
        """The RAG prompt, refused before any compute (``InvalidRequest``, ``PromptTooLong``) when
        the question or the prompt with ``max_new_tokens`` more tokens is over ``limits``. Every
        prompt any front end or backend runs is built here."""
        self.limits.check_question(question)
        prompt = self.prompt_format.build(chunks, question)
        self.limits.check_prompt(len(prompt.ids), max_new_tokens)
        return prompt

    @torch.inference_mode()
    def prefill(
        self,
        chunks: list[str],
        question: str,
        mode: Mode = "blend",
        recompute_ratio: float | None = None,
        config: BlendConfig | None = None,
        max_new_tokens: int = 0,
        scores: torch.Tensor | None = None,
    ) -> Prefill:
        """Build the RAG prompt and prefill it; ``logits`` are for the first answer token.
        ``max_new_tokens`` reserves room in the returned KV buffer for decoding. ``scores``
        (blend only; ``[prompt tokens]``, higher = recompute first) rank the chunk tokens instead
        of the configured selector, e.g. a ranking under study (``eval.rankings``)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        cfg = self._resolve_config(recompute_ratio, config)
        start = time.perf_counter()
        prompt = self.build_prompt(chunks, question, max_new_tokens)
        # Room after the prompt: decoding's tokens, or the preview's draft tokens.
        capacity = len(prompt.ids) + max(max_new_tokens, cfg.preview_draft)
        try:
            buf, plan, out, hits, misses = self._run_prefill(mode, cfg, prompt, capacity, scores)
        except CorruptEntry:
            # A reused layer failed its checksum while loading. The store dropped that entry, so
            # this second try recomputes the chunk instead.
            buf, plan, out, hits, misses = self._run_prefill(mode, cfg, prompt, capacity, scores)
        logits = self.model.logits(out.last_hidden)
        n = len(prompt.ids)
        stats = PrefillStats(
            mode=mode,
            n_tokens=n,
            n_recomputed=out.n_active_per_layer[-1],
            compute_fraction=sum(out.n_active_per_layer) / (n * len(out.n_active_per_layer)),
            cache_hits=hits,
            cache_misses=misses,
            load_stall_s=buf.load_stall_s,
            ttft_s=time.perf_counter() - start,
        )
        return Prefill(logits, stats, prompt, buf, plan, out.positions)

    def _run_prefill(
        self, mode: Mode, cfg: BlendConfig, prompt: RAGPrompt, capacity: int, scores: torch.Tensor | None
    ):
        ids = self._ids(prompt.ids)
        buf = KVBuffer(self.model.args, capacity, self.dtype, self.device)
        buf.length = len(ids)
        plan, hits, misses = self._plan(mode, cfg, prompt, buf, scores)
        positions = plan.positions
        out = run_layers(
            self.model,
            self.rotary,
            buf,
            ids[positions],
            positions,
            plan.filters,
            last_row_only=True,
            correction=plan.correction,
        )
        return buf, plan, out, hits, misses

    def _plan(
        self, mode: Mode, cfg: BlendConfig, prompt: RAGPrompt, buf: KVBuffer, scores: torch.Tensor | None
    ) -> tuple[PrefillPlan, int, int]:
        """Load reused KV into ``buf``; return (the plan, store hits, misses)."""
        n = len(prompt.ids)
        if mode == "full":
            return PrefillPlan(self._arange(0, n)), 0, 0
        exact_first = self.chunk_context == "prefix" and prompt.prefix == self.prompt_format.prefix_ids
        # prefix mode reuses only what is exact: the prefix, and the first chunk when it is exact.
        n_reused = (1 if exact_first else 0) if mode == "prefix" else len(prompt.chunks)
        with record_function("blendrag.store_read"):
            segments = [(0, self.chunk_kv.segments([], [prompt.prefix])[0][0])]
            offsets = prompt.chunk_offsets()[:n_reused]
            fetched = self.chunk_kv.segments(self.chunk_kv.context_ids, prompt.chunks[:n_reused])
            segments += [(offset, kv) for offset, (kv, _) in zip(offsets, fetched, strict=True)]
            hits = sum(hit for _, hit in fetched)
        with record_function("blendrag.realign"):
            buf.load(segments, self.rotary, background=self.prefetch)
        misses = len(segments) - 1 - hits
        if mode == "prefix":
            return PrefillPlan(self._arange(segments[-1][0] + segments[-1][1].n_tokens, n)), hits, misses
        if mode == "reuse":
            return PrefillPlan(self._arange(prompt.suffix_start, n)), hits, misses
        return self.blend_plan(cfg, prompt, buf, exact_first, scores), hits, misses

    def blend_plan(
        self,
        cfg: BlendConfig,
        prompt: RAGPrompt,
        buf: KVBuffer,
        exact_first: bool = False,
        scores: torch.Tensor | None = None,
    ) -> PrefillPlan:
        """Which tokens ``blend`` recomputes over the reused KV in ``buf``, and how it corrects
        the others (``blendrag tune`` plans its training passes with it too)."""
        # An exact first chunk needs no recompute at all: it starts after the same prefix.
        skip = len(prompt.chunks[0]) if exact_first and prompt.chunks else 0
        positions = self._arange(len(prompt.prefix) + skip, len(prompt.ids))
        forced = self._ids(
            [
                o + j
                for o, c in zip(prompt.chunk_offsets(), prompt.chunks, strict=True)
                for j in range(min(cfg.first_k, len(c)))
            ],
        )
        n_chunk_tokens = prompt.suffix_start - len(prompt.prefix)
        if scores is not None:  # the caller's ranking, cut before the pass as the preview's is
            cfg = replace(cfg, selector="preview")
        elif cfg.selector == "preview":
            suffix = self._arange(prompt.suffix_start, len(prompt.ids))
            ids = self._ids(prompt.suffix)
            with record_function("blendrag.preview"):
                scores = preview_attention(cfg, self.model, self.rotary, buf, ids, suffix)
        positions, filters = plan_selection(
            cfg, positions, n_chunk_tokens, prompt.suffix_start, forced, scores
        )
        return PrefillPlan(positions, filters, scores, self._offset_correction(cfg, prompt, buf))

    def _offset_correction(
        self, cfg: BlendConfig, prompt: RAGPrompt, buf: KVBuffer
    ) -> OffsetCorrection | None:
        if cfg.offset_weight == 0:
            return None
        spans = [(o, len(c)) for o, c in zip(prompt.chunk_offsets(), prompt.chunks, strict=True)]
        return OffsetCorrection(spans, cfg.offset_weight, self.rotary, buf)

    # ---- decoding ---------------------------------------------------------------------------

    def generate(self, chunks: list[str], question: str, **kwargs) -> Generation:
        """Prefill (see ``prefill``) then decode; keyword arguments as ``stream``."""
        stream = self.stream(chunks, question, **kwargs)
        for _ in stream:
            pass
        assert stream.result is not None
        return stream.result

    def stream(
        self,
        chunks: list[str],
        question: str,
        mode: Mode = "blend",
        recompute_ratio: float | None = None,
        config: BlendConfig | None = None,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: list[str] | tuple[str, ...] = (),
    ) -> GenerationStream:
        """Prefill lazily on first iteration, then yield text pieces as they are decoded."""
        params = SamplingParams(max_new_tokens, temperature, top_p, seed, tuple(stop))
        return self.decode(chunks, question, mode, self._resolve_config(recompute_ratio, config), params)

    def decode(
        self, chunks: list[str], question: str, mode: Mode, config: BlendConfig | None, params: SamplingParams
    ) -> GenerationStream:
        """``stream`` with its settings as the typed values a ``RAGRequest`` holds (``config``
        None: the engine's own)."""
        return GenerationStream(self._decode(chunks, question, mode, config, params))

    @torch.inference_mode()
    def _decode(
        self, chunks: list[str], question: str, mode: Mode, config: BlendConfig | None, params: SamplingParams
    ):
        pre = self.prefill(chunks, question, mode, config=config, max_new_tokens=params.max_new_tokens)
        sample, detok = Sampler(params), Detokenizer(self.tokenizer, params.stop)
        start, finish = time.perf_counter(), "length"
        logits = pre.logits
        for _ in range(params.max_new_tokens):
            token = sample(logits)
            if token in self.eos_ids:
                finish = "stop"
                break
            yield detok.add(token)
            if detok.stopped:
                finish = "stop"
                break
            logits = self._step(pre.kv, token)
        yield detok.flush()
        decode_s = time.perf_counter() - start
        stats = GenerationStats(**pre.stats.to_dict(), n_generated=len(detok.ids), decode_s=decode_s)
        yield Generation(detok.text, detok.ids, stats, finish, pre.logits)

    @torch.inference_mode()
    def continuation_logits(self, pre: Prefill, token_ids: list[int]) -> torch.Tensor:
        """Teacher forcing: append ``token_ids`` after the prefilled prompt in one pass and return
        the next-token logits after each of them, ``[len(token_ids), vocab]``. Greedy decoding
        from ``pre`` reproduces ``token_ids`` exactly when every row's argmax is the next id."""
        return self._extend(pre.kv, token_ids)

    def greedy_answer(self, pre: Prefill, max_new_tokens: int) -> tuple[list[int], torch.Tensor]:
        """The greedy continuation of ``pre`` (at most ``max_new_tokens``, ending at an EOS) and
        the logits each of its tokens was chosen from, ``[len(answer), vocab]``: the targets that
        ``blendrag tune`` and ``eval.fidelity`` compare blends with."""
        logits, answer, rows = pre.logits, [], []
        for _ in range(max_new_tokens):
            rows.append(logits)
            answer.append(int(logits.argmax()))
            if answer[-1] in self.eos_ids:
                break
            logits = self.continuation_logits(pre, answer[-1:])[0]
        return answer, torch.stack(rows)

    def _step(self, buf: KVBuffer, token: int) -> torch.Tensor:
        return self._extend(buf, [token])[0]

    def _extend(self, buf: KVBuffer, token_ids: list[int]) -> torch.Tensor:
        """Append ``token_ids`` at the next positions of ``buf``; their next-token logits."""
        return append_tokens(self.model, self.rotary, buf, self._ids(token_ids))


def _attach_adapter(
    adapter: ReuseAdapter | None, model: torch.nn.Module, chunk_context: ChunkContext
) -> ReuseAdapter | None:
    if adapter is None:
        return None
    if chunk_context != "none":
        raise BlendRAGError(
            "a reuse adapter is the context chunks are precomputed after: it needs chunk_context='none'"
        )
    adapter.check_model(model)
    weight = next(model.parameters())
    return adapter.to(weight.device)


def resolve_device(
    device: torch.device | str | None, dtype: torch.dtype | str | None
) -> tuple[torch.device, torch.dtype]:
    """The engine's device (default CUDA when available, else CPU) and dtype (default bf16 on
    CUDA, where it halves memory and doubles tensor-core throughput; fp32 on CPU, where bf16
    matmuls are slower on most cores)."""
    try:
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as err:
        raise BlendRAGError(f"device {device!r}: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BlendRAGError(f"device {str(device)!r}: CUDA is not available on this machine")
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise BlendRAGError(f"dtype {dtype!r}: not a torch dtype (e.g. float32, bfloat16)")
        dtype = getattr(torch, dtype)
    return device, dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)


def _eos_ids(loaded: LoadedModel) -> set[int]:
    ids = {loaded.tokenizer.eos_token_id}
    gen_eos = getattr(loaded.config, "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    for token in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>"):
        tid = loaded.tokenizer.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid != loaded.tokenizer.unk_token_id:
            ids.add(tid)
    ids.discard(None)
    return ids
