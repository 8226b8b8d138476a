"""One RAG request as every front end states it, what it answers, and how long its prompt may be.

Each front end (``blendrag query``, ``POST /query``, ``POST /v1/chat/completions``, LangChain's
``ChatBlendRAG``) maps its own settings into a ``RAGRequest`` once; below that, the service, the
backends and the engine read only the request. One set of defaults serves them all: ``top_k``
4 chunks retrieved, ``mode`` blend with the engine's ``BlendConfig`` (recompute ratio 0.15), and
``SamplingParams`` (128 new tokens at most, greedy). Every prompt is held to the engine's
``PromptLimits`` before any compute: a question of at most 4,000 characters, and prompt tokens
plus ``max_new_tokens`` within the model's context length.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from .config import MODES, BlendConfig, Mode
from .errors import BlendRAGError

if TYPE_CHECKING:
    from .engine import Generation

DEFAULT_TOP_K = 4
# Room for a sentence or two, which RAG answers are (the prompt asks for five words at most).
DEFAULT_MAX_NEW_TOKENS = 128
MAX_QUESTION_CHARS = 4000


class InvalidRequest(BlendRAGError, ValueError):
    """A request that cannot be run as stated. ``param`` names the setting at fault, if one is."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class PromptTooLong(InvalidRequest):
    """The prompt, with the tokens asked for, does not fit the model's context."""


@dataclass(frozen=True)
class SamplingParams:
    """How the answer is decoded (``blendrag.sampling.Sampler``)."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError("temperature must be >= 0 and top_p in (0, 1]")


@dataclass(frozen=True)
class RAGRequest:
    question: str
    chunks: tuple[str, ...] | None = None  # given: blend exactly these, in order; None: retrieve
    top_k: int = DEFAULT_TOP_K  # chunks to retrieve (when ``chunks`` is None)
    mode: Mode = "blend"
    blend: BlendConfig | None = None  # None: the answering engine's own
    sampling: SamplingParams = field(default_factory=SamplingParams)

    def __post_init__(self) -> None:
        if not self.question.strip():
            raise InvalidRequest("the question is empty", "question")
        if self.mode not in MODES:
            raise InvalidRequest(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}", "mode")
        if self.top_k < 1:
            raise InvalidRequest(f"top_k must be >= 1, got {self.top_k}", "top_k")


def blend_override(base: BlendConfig, recompute_ratio: float | None) -> BlendConfig | None:
    """A request's ``blend``: ``base`` (the answering engine's config) at the ratio the caller
    named, or None (the engine's own) when it named none."""
    return None if recompute_ratio is None else replace(base, recompute_ratio=recompute_ratio)


@dataclass(frozen=True)
class PromptLimits:
    """How long a prompt may be. ``context_length``: the model's (its config's
    ``max_position_embeddings``); ``max_question_chars``: the question's own cap, so that one
    request cannot hold the compute worker for minutes with a prompt that is mostly question."""

    context_length: int
    max_question_chars: int = MAX_QUESTION_CHARS

    def check_question(self, question: str) -> None:
        if len(question) > self.max_question_chars:
            raise InvalidRequest(
                f"the question is {len(question):,} characters, over the limit of "
                f"{self.max_question_chars:,}",
                "question",
            )

    def check_prompt(self, n_tokens: int, max_new_tokens: int) -> None:
        if n_tokens + max_new_tokens > self.context_length:
            raise PromptTooLong(
                f"the prompt ({n_tokens:,} tokens) plus max_tokens ({max_new_tokens:,}) exceeds the "
                f"model's context length ({self.context_length:,} tokens); ask for fewer or shorter "
                "chunks (top_k, documents) or fewer tokens (max_tokens)"
            )


@dataclass(frozen=True)
class SourceChunk:
    """A chunk placed in the prompt; ``id``, ``doc_id`` and ``score`` only when retrieved."""

    text: str
    id: int | None = None
    doc_id: str | None = None
    score: float | None = None


@dataclass(frozen=True)
class Answer:
    generation: Generation
    chunks: list[SourceChunk]
    retrieval_s: float

    def stats_dict(self) -> dict:
        """The answer's stats as the API serves them: the generation's, and the retrieval time."""
        return {**self.generation.stats.to_dict(), "retrieval_s": self.retrieval_s}
