"""OpenAI-compatible ``POST /v1/chat/completions`` and ``GET /v1/models`` (as vLLM serves them).

The engine's prompt is fixed (system prompt, chunks, question), so a conversation maps onto it
as: the question is the last user message, and retrieval runs on it. Earlier turns and system
messages are accepted (clients send them) but do not enter the prompt. Extension fields, which the
``openai`` client sends through ``extra_body``: ``documents`` (blend these texts, no
retrieval), ``top_k``, ``mode`` and ``recompute_ratio``. Every response carries a ``blendrag``
object with the chunks used and the engine's stats.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, HTTPException, Request
from pydantic import BaseModel, Field, model_validator

from blendrag.config import BlendConfig, Mode
from blendrag.request import (
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_TOP_K,
    Answer,
    RAGRequest,
    SamplingParams,
    blend_override,
)

from .errors import ERROR_RESPONSES, request_id
from .query import STREAM_RESPONSE, chunk_out
from .rag import AnswerStream, RAGService
from .schemas import ChunkOut, MaxTokens, Ratio, Strict, Temperature, TopK
from .sse import event, sse_response


class TextPart(Strict):
    type: Literal["text"]
    text: str


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    @property
    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(Strict):
    include_usage: bool = False


class ChatCompletionRequest(Strict):
    model: str | None = Field(None, description="Must name the served model (see /v1/models) if given")
    messages: Annotated[list[Message], Field(min_length=1)]
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    temperature: Temperature = 0.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    n: Literal[1] = 1
    seed: int | None = None
    stop: str | Annotated[list[str], Field(max_length=8)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # blendrag extensions
    documents: Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)] | None = Field(
        None, description="Blend these texts as the chunks, in this order, instead of retrieving"
    )
    top_k: TopK = DEFAULT_TOP_K
    mode: Mode = "blend"
    recompute_ratio: Ratio | None = None

    @model_validator(mode="after")
    def _has_question(self) -> ChatCompletionRequest:
        if not self.question:
            raise ValueError("messages must contain a user message with non-empty text")
        return self

    @property
    def question(self) -> str:
        users = [m for m in self.messages if m.role == "user"]
        return users[-1].text.strip() if users else ""

    def to_request(self, base: BlendConfig) -> RAGRequest:
        """The core request; ``base``: the BlendConfig of the engine that answers."""
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        sampling = SamplingParams(
            max_new_tokens=self.max_completion_tokens or self.max_tokens or DEFAULT_MAX_NEW_TOKENS,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            stop=stop,
        )
        return RAGRequest(
            self.question,
            chunks=None if self.documents is None else tuple(self.documents),
            top_k=self.top_k,
            mode=self.mode,
            blend=blend_override(base, self.recompute_ratio),
            sampling=sampling,
        )


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class BlendInfo(BaseModel):
    chunks: list[ChunkOut]
    stats: dict


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    blendrag: BlendInfo


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "blendrag"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def openai_router(resolve: Callable[..., RAGService], model_name: str) -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["openai"])
    started = int(time.time())

    # The dependency only checks the API key: every namespace serves the same model.
    @router.get(
        "/models",
        response_model=ModelList,
        responses={401: ERROR_RESPONSES[401]},
        dependencies=[Depends(resolve)],
    )
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=model_name, created=started)])

    @router.post(
        "/chat/completions",
        response_model=ChatCompletion,
        responses={**ERROR_RESPONSES, **STREAM_RESPONSE, 404: ERROR_RESPONSES[400]},
    )
    async def chat_completions(
        body: ChatCompletionRequest, request: Request, service: RAGService = Depends(resolve)
    ):
        """Streaming sends `data: {chat.completion.chunk}` events and ends with `data: [DONE]`."""
        if body.model is not None and body.model != model_name:
            raise HTTPException(404, f"model {body.model!r} is not served here; use {model_name!r}")
        stream = await service.stream(body.to_request(service.engine.config))
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            chunks = _chunks(stream, completion_id, created, model_name, usage)
            return sse_response(chunks, request_id(request), None, tail=("data: [DONE]\n\n",))
        async for _ in stream:
            pass
        return _completion(stream.answer, completion_id, created, model_name)

    return router


def _usage(answer: Answer) -> Usage:
    stats = answer.generation.stats
    prompt, completion = stats.n_tokens, stats.n_generated
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _info(answer: Answer) -> dict:
    return BlendInfo(chunks=[chunk_out(c) for c in answer.chunks], stats=answer.stats_dict()).model_dump()


def _completion(answer: Answer, completion_id: str, created: int, model: str) -> ChatCompletion:
    choice = Choice(
        message=AssistantMessage(content=answer.generation.text),
        finish_reason=answer.generation.finish_reason,
    )
    return ChatCompletion(
        id=completion_id,
        created=created,
        model=model,
        choices=[choice],
        usage=_usage(answer),
        blendrag=_info(answer),
    )


async def _chunks(
    stream: AnswerStream, completion_id: str, created: int, model: str, include_usage: bool
) -> AsyncIterator[str]:
    def chunk(choices: list[dict], **extra) -> str:
        body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model}
        # vLLM's convention: with include_usage every chunk has a usage key, null until the last.
        return event({**body, "choices": choices, **({"usage": None} if include_usage else {}), **extra})

    def delta(content: dict, finish: str | None = None) -> dict:
        return {"index": 0, "delta": content, "logprobs": None, "finish_reason": finish}

    yield chunk([delta({"role": "assistant", "content": ""})])
    async for piece in stream:
        yield chunk([delta({"content": piece})])
    answer = stream.answer
    yield chunk([delta({}, answer.generation.finish_reason)], blendrag=_info(answer))
    if include_usage:
        yield chunk([], usage=_usage(answer).model_dump())
    yield "data: [DONE]\n\n"
