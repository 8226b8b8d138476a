"""Request and response bodies of the native REST routes (``/query``, ``/search``, ``/documents``),
and the field types the OpenAI-compatible routes and LangChain share with them.

Request bodies are strict: unknown fields are refused, and so are values of another JSON type
(``"stream": "yes"``, ``"top_k": true``, ``"temperature": "0.5"``). Defaults are the core's
(``blendrag.request``).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

from blendrag.config import BlendConfig, Mode
from blendrag.request import (
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_TOP_K,
    MAX_QUESTION_CHARS,
    RAGRequest,
    SamplingParams,
    blend_override,
)

MAX_TOP_K = 32
MAX_NEW_TOKENS = 1024
MAX_DOCUMENT_CHARS = 1_000_000
MAX_DOCUMENTS_PER_REQUEST = 256


def _valid_ratio(ratio: float) -> float:
    # The range is BlendConfig's to state: building one checks it (ValueError: a 422).
    return BlendConfig(recompute_ratio=ratio).recompute_ratio


# The length cap is the engine's (PromptLimits.max_question_chars), checked before retrieval.
Question = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1),
    Field(description=f"At most the server's question limit (default {MAX_QUESTION_CHARS:,} characters)"),
]
SearchQuery = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_QUESTION_CHARS)
]
TopK = Annotated[int, Field(ge=1, le=MAX_TOP_K, description="Chunks to retrieve")]
Ratio = Annotated[
    float,
    AfterValidator(_valid_ratio),
    Field(description="Share of chunk tokens blend recomputes, 0 to 1 (the engine's if absent)"),
]
MaxTokens = Annotated[int, Field(ge=1, le=MAX_NEW_TOKENS, description="Answer tokens to generate at most")]
Temperature = Annotated[float, Field(ge=0.0, le=2.0, description="0 is greedy")]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class QueryRequest(Strict):
    question: Question
    top_k: TopK = DEFAULT_TOP_K
    mode: Mode = "blend"
    recompute_ratio: Ratio | None = None
    max_tokens: MaxTokens = DEFAULT_MAX_NEW_TOKENS
    temperature: Temperature = 0.0
    stream: bool = Field(False, description="Answer as server-sent events (see the route description)")

    def to_request(self, base: BlendConfig) -> RAGRequest:
        """The core request; ``base``: the BlendConfig of the engine that answers."""
        return RAGRequest(
            self.question,
            top_k=self.top_k,
            mode=self.mode,
            blend=blend_override(base, self.recompute_ratio),
            sampling=SamplingParams(max_new_tokens=self.max_tokens, temperature=self.temperature),
        )


class SearchRequest(Strict):
    query: SearchQuery
    top_k: TopK = DEFAULT_TOP_K


class ChunkOut(BaseModel):
    id: int | None = Field(description="Chunk id in the index (null for documents given in the request)")
    doc_id: str | None
    score: float | None = Field(description="Cosine similarity to the question (null when not retrieved)")
    text: str


class QueryStats(BaseModel):
    """Null marks what the server's backend cannot tell (see ``Health.backend``)."""

    mode: Mode
    ttft_s: float | None = Field(
        description="Prefill time to the first token, excluding queueing and retrieval "
        "(vllm: from vLLM scheduling the request to its first token, the connector's blend included)"
    )
    n_tokens: int = Field(description="Prompt tokens")
    n_recomputed: int | None = Field(
        description="Prompt tokens computed in the last layer (vllm: null, the connector computes "
        "them inside vLLM's worker and does not report them back)"
    )
    cache_hits: int = Field(
        description="Chunks whose KV came from the store (vllm: every chunk when the connector "
        "blended the prompt, else 0)"
    )
    cache_misses: int = Field(
        description="Chunks whose KV was computed for this request (vllm: 0 when the connector "
        "blended the prompt, else every chunk: vLLM prefilled the whole prompt)"
    )
    n_generated: int
    decode_s: float | None
    retrieval_s: float
    vllm_cached_tokens: int | None = Field(
        None,
        description="vllm only: prompt tokens vLLM did not compute itself, n_tokens - 1 when the "
        "connector blended the prompt (null with the engine backend)",
    )


class QueryResponse(BaseModel):
    answer: str
    finish_reason: Literal["stop", "length"]
    chunks: list[ChunkOut]
    stats: QueryStats


class SearchResponse(BaseModel):
    chunks: list[ChunkOut]


class DocumentIn(Strict):
    id: Annotated[str, StringConstraints(min_length=1, max_length=512)]
    text: Annotated[str, StringConstraints(min_length=1, max_length=MAX_DOCUMENT_CHARS)]
    metadata: dict = Field(default_factory=dict)


class AddDocumentsRequest(Strict):
    documents: Annotated[list[DocumentIn], Field(min_length=1, max_length=MAX_DOCUMENTS_PER_REQUEST)]


JobStatus = Literal["queued", "running", "done", "failed"]


class Job(BaseModel):
    job_id: str
    status: JobStatus
    queryable: bool = Field(description="True once the documents are searchable and their KV is stored")
    status_url: str
    document_ids: list[str]
    added_chunks: int | None = None
    kv_computed: int | None = None
    error: str | None = None


class DeleteResponse(BaseModel):
    document_id: str
    chunks_deleted: int


class Health(BaseModel):
    status: Literal["ok"]
    backend: Literal["engine", "vllm"] = Field(
        description="Who prefills and decodes (blendrag serve --backend); vllm gives fewer stats"
    )
    model: str
    fingerprint: str
    index_documents: int
    index_chunks: int
