"""LangChain integration: ``BlendRAGRetriever`` and ``ChatBlendRAG``.

Both work in-process (an index directory / a ``BlendEngine``) or against a running server
(``base_url``). In-process calls go through the engine's ``ComputeWorker``, like the server's.

Where ``ChatBlendRAG`` gets its chunks, first match wins:

1. ``documents=`` passed at call time (``chat.invoke(msgs, documents=docs)`` or ``chat.bind``),
2. ``additional_kwargs["documents"]`` of the last human message, which ``blend_prompt`` sets, so
   a retriever can feed the model in an LCEL chain::

       chain = {"documents": retriever, "question": RunnablePassthrough()} | blend_prompt | chat

3. the model's own ``retriever``,
4. remote: the server retrieves from its index; in-process: no chunks.

Documents may be ``Document`` objects or strings. The question is the last human message.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from blendrag.extras import missing_extra

try:
    from langchain_core.callbacks import (
        AsyncCallbackManagerForRetrieverRun,
        CallbackManagerForLLMRun,
        CallbackManagerForRetrieverRun,
    )
    from langchain_core.documents import Document
    from langchain_core.language_models import BaseChatModel
    from langchain_core.language_models.base import LangSmithParams
    from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, HumanMessage
    from langchain_core.messages.ai import UsageMetadata
    from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
    from langchain_core.retrievers import BaseRetriever
    from langchain_core.runnables import RunnableLambda
except ImportError as err:
    raise missing_extra("langchain", "blendrag's LangChain integration", err) from err

from pydantic import ConfigDict, Field, PrivateAttr, model_validator

from blendrag.config import BlendConfig, Mode
from blendrag.request import (
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_TOP_K,
    Answer,
    RAGRequest,
    SamplingParams,
    blend_override,
)
from blendrag.retriever import Retriever

from . import blocking
from .client import BlendRAGClient
from .rag import RAGService
from .schemas import Ratio
from .worker import ComputeWorker


class BlendRAGRetriever(BaseRetriever):
    """Chunks from a blendrag index, best first; ``metadata`` has ``chunk_id``, ``doc_id``, ``score``.

    Give ``index_dir`` (in-process) or ``base_url`` (a running ``blendrag serve``)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    index_dir: str | None = None
    base_url: str | None = None
    k: int = Field(DEFAULT_TOP_K, ge=1)
    timeout: float | None = 120.0
    _retriever: Retriever | None = PrivateAttr(None)
    _worker: ComputeWorker | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _one_source(self) -> BlendRAGRetriever:
        if (self.index_dir is None) == (self.base_url is None):
            raise ValueError("give exactly one of index_dir (in-process) or base_url (server)")
        return self

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun, k: int | None = None
    ) -> list[Document]:
        if self.base_url is not None:
            return [
                _document(c) for c in BlendRAGClient(self.base_url, self.timeout).search(query, k or self.k)
            ]
        return self._local_search(query, k or self.k)

    async def _aget_relevant_documents(
        self, query: str, *, run_manager: AsyncCallbackManagerForRetrieverRun, k: int | None = None
    ) -> list[Document]:
        if self.base_url is not None:
            chunks = await BlendRAGClient(self.base_url, self.timeout).asearch(query, k or self.k)
            return [_document(c) for c in chunks]
        return await self._worker_for_index().run(self._search_on_worker, query, k or self.k)

    def _local_search(self, query: str, k: int) -> list[Document]:
        return self._worker_for_index().call(self._search_on_worker, query, k)

    def _worker_for_index(self) -> ComputeWorker:
        # Searches embed on CPU: one at a time per retriever, on a thread of its own.
        if self._worker is None:
            self._worker = ComputeWorker("blendrag-retriever")
        return self._worker

    def _search_on_worker(self, query: str, k: int) -> list[Document]:
        if self._retriever is None:
            self._retriever = Retriever(Path(self.index_dir))
        return [
            _document({"id": c.id, "doc_id": c.doc_id, "score": c.score, "text": c.text}, c.metadata)
            for c in self._retriever.search(query, k)
        ]


def _document(chunk: dict, metadata: dict | None = None) -> Document:
    meta = {**(metadata or {}), "chunk_id": chunk["id"], "doc_id": chunk["doc_id"], "score": chunk["score"]}
    return Document(page_content=chunk["text"], metadata=meta)


def _to_blend_message(inputs: dict) -> list[BaseMessage]:
    texts = [d.page_content if isinstance(d, Document) else str(d) for d in inputs["documents"]]
    return [HumanMessage(content=inputs["question"], additional_kwargs={"documents": texts})]


blend_prompt = RunnableLambda(_to_blend_message, name="blend_prompt")
"""``{"question": str, "documents": [Document | str]}`` -> the message ``ChatBlendRAG`` blends."""


class ChatBlendRAG(BaseChatModel):
    """Answers the last human message from blended chunk KV (see the module doc for chunk sources).

    Give ``engine`` (a ``BlendEngine``, in-process) or ``base_url`` (a running server). Usage is in
    ``usage_metadata``; chunks and engine stats (TTFT, recomputed tokens, cache hits) are in
    ``response_metadata``."""

    model_config = ConfigDict(arbitrary_types_allowed=True, populate_by_name=True)

    engine: Any = Field(None, exclude=True)
    base_url: str | None = None
    retriever: BaseRetriever | None = Field(None, exclude=True)
    model_name: str | None = Field(None, alias="model", description="Server model id (remote)")
    mode: Mode = "blend"
    recompute_ratio: Ratio | None = None
    top_k: int = Field(DEFAULT_TOP_K, ge=1)
    max_tokens: int = Field(DEFAULT_MAX_NEW_TOKENS, ge=1)
    temperature: float = Field(0.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: list[str] | None = None
    timeout: float | None = 120.0
    max_retries: int = Field(0, description="Accepted for LangChain compatibility; requests are not retried")
    streaming: bool = False

    @model_validator(mode="after")
    def _one_backend(self) -> ChatBlendRAG:
        if (self.engine is None) == (self.base_url is None):
            raise ValueError("give exactly one of engine (in-process) or base_url (server)")
        return self

    @property
    def _llm_type(self) -> str:
        return "blendrag"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_name": self._model_id(), "mode": self.mode, "recompute_ratio": self.recompute_ratio}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        return LangSmithParams(
            ls_provider="blendrag",
            ls_model_name=kwargs.get("model") or self._model_id(),
            ls_model_type="chat",
            ls_temperature=kwargs.get("temperature", self.temperature),
            ls_max_tokens=kwargs.get("max_tokens", self.max_tokens),
            ls_stop=stop or self.stop,
        )

    def _model_id(self) -> str:
        if self.model_name:
            return self.model_name
        return Path(self.engine.model_path).name if self.engine is not None else "blendrag"

    # ---- one request ------------------------------------------------------------------------

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        if self.streaming:
            chunks = list(self._stream(messages, stop, run_manager, **kwargs))
            message = chunks[0].message
            for chunk in chunks[1:]:
                message += chunk.message
            return ChatResult(generations=[ChatGeneration(message=_as_message(message))])
        request = self._request(messages, stop, kwargs)
        if self.base_url is not None:
            body = self._client().chat(request, self.model_name)
            text, meta, usage = _remote_result(body)
        else:
            answer = blocking.answer(RAGService(self.engine), request)
            text, meta, usage = answer.generation.text, _metadata(answer, self._model_id()), _usage(answer)
        message = AIMessage(content=text, response_metadata=meta, usage_metadata=usage)
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        request = self._request(messages, stop, kwargs)
        pieces = self._remote_pieces(request) if self.base_url else self._local_pieces(request)
        for piece in pieces:
            if isinstance(piece, str):
                if run_manager:
                    run_manager.on_llm_new_token(piece)
                yield ChatGenerationChunk(message=AIMessageChunk(content=piece))
            else:
                yield ChatGenerationChunk(message=piece)

    def _local_pieces(self, request: RAGRequest) -> Iterator[str | AIMessageChunk]:
        stream = blocking.BlockingStream(RAGService(self.engine), request)
        yield from stream
        answer = stream.answer
        yield AIMessageChunk(
            content="", response_metadata=_metadata(answer, self._model_id()), usage_metadata=_usage(answer)
        )

    def _remote_pieces(self, request: RAGRequest) -> Iterator[str | AIMessageChunk]:
        meta: dict = {}
        for chunk in self._client().stream_chat(request, self.model_name):
            for choice in chunk["choices"]:
                if choice["delta"].get("content"):
                    yield choice["delta"]["content"]
                if choice["finish_reason"]:
                    meta = {
                        "finish_reason": choice["finish_reason"],
                        "model_name": chunk["model"],
                        **chunk["blendrag"],
                    }
            if chunk.get("usage"):
                yield AIMessageChunk(
                    content="", response_metadata=meta, usage_metadata=_usage_of(chunk["usage"])
                )

    # ---- request building -------------------------------------------------------------------

    def _request(self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict) -> RAGRequest:
        """The call's settings (keyword arguments over the model's fields) as the core request."""
        question = _question(messages)
        sampling = SamplingParams(
            max_new_tokens=kwargs.get("max_tokens", self.max_tokens),
            temperature=kwargs.get("temperature", self.temperature),
            top_p=kwargs.get("top_p", self.top_p),
            seed=kwargs.get("seed", self.seed),
            stop=tuple(stop or self.stop or ()),
        )
        # Remote, only the ratio is sent: the server blends with its engine's other settings.
        base = self.engine.config if self.engine is not None else BlendConfig()
        return RAGRequest(
            question,
            chunks=self._documents(messages, question, kwargs.get("documents")),
            top_k=kwargs.get("top_k", self.top_k),
            mode=kwargs.get("mode", self.mode),
            blend=blend_override(base, kwargs.get("recompute_ratio", self.recompute_ratio)),
            sampling=sampling,
        )

    def _documents(
        self, messages: list[BaseMessage], question: str, given: Sequence | None
    ) -> tuple[str, ...] | None:
        if given is None:
            human = [m for m in messages if isinstance(m, HumanMessage)]
            given = human[-1].additional_kwargs.get("documents") if human else None
        if given is None and self.retriever is not None:
            given = self.retriever.invoke(question)
        if given is None:
            return None if self.base_url is not None else ()  # remote: the server retrieves
        return tuple(d.page_content if isinstance(d, Document) else str(d) for d in given)

    def _client(self) -> BlendRAGClient:
        return BlendRAGClient(self.base_url, self.timeout)


def _question(messages: list[BaseMessage]) -> str:
    human = [m for m in messages if isinstance(m, HumanMessage)]
    question = _text(human[-1].content).strip() if human else ""
    if not question:
        raise ValueError("ChatBlendRAG needs a human message with text: it is the question")
    return question


def _text(content: str | list) -> str:
    if isinstance(content, str):
        return content
    return "".join(
        b if isinstance(b, str) else b.get("text", "") for b in content if isinstance(b, str | dict)
    )


def _usage(answer: Answer) -> UsageMetadata:
    n_in, n_out = answer.generation.stats.n_tokens, answer.generation.stats.n_generated
    return UsageMetadata(input_tokens=n_in, output_tokens=n_out, total_tokens=n_in + n_out)


def _usage_of(usage: dict) -> UsageMetadata:
    return UsageMetadata(
        input_tokens=usage["prompt_tokens"],
        output_tokens=usage["completion_tokens"],
        total_tokens=usage["total_tokens"],
    )


def _metadata(answer: Answer, model: str) -> dict:
    chunks = [{"id": c.id, "doc_id": c.doc_id, "score": c.score, "text": c.text} for c in answer.chunks]
    finish = answer.generation.finish_reason
    return {"finish_reason": finish, "model_name": model, "chunks": chunks, "stats": answer.stats_dict()}


def _remote_result(body: dict) -> tuple[str, dict, UsageMetadata]:
    choice = body["choices"][0]
    meta = {"finish_reason": choice["finish_reason"], "model_name": body["model"], **body["blendrag"]}
    return choice["message"]["content"], meta, _usage_of(body["usage"])


def _as_message(chunk: AIMessageChunk) -> AIMessage:
    return AIMessage(
        content=chunk.content, response_metadata=chunk.response_metadata, usage_metadata=chunk.usage_metadata
    )
