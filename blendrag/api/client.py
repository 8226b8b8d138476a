"""A small HTTP client for a running blendrag server (used by the LangChain classes' remote mode).

It speaks the server's own routes: ``/search`` for retrieval and the OpenAI-compatible
``/v1/chat/completions`` for answers, each a ``RAGRequest`` sent as that route's body (with
``documents`` when the request brings its own chunks).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from blendrag.errors import BlendRAGError
from blendrag.extras import missing_extra
from blendrag.request import RAGRequest

try:
    import httpx
except ImportError as err:
    raise missing_extra("server", "blendrag's HTTP client", err) from err


class ServerError(BlendRAGError):
    """The server answered with an error (its message and request id are in the text)."""


class BlendRAGClient:
    def __init__(self, base_url: str, timeout: float | None = 120.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout

    def search(self, query: str, top_k: int) -> list[dict]:
        return self._post("/search", {"query": query, "top_k": top_k})["chunks"]

    async def asearch(self, query: str, top_k: int) -> list[dict]:
        async with httpx.AsyncClient(timeout=self.timeout) as http:
            response = await http.post(f"{self.base_url}/search", json={"query": query, "top_k": top_k})
        return _checked(response)["chunks"]

    def chat(self, request: RAGRequest, model: str | None = None) -> dict:
        return self._post("/v1/chat/completions", dict(chat_body(request, model), stream=False))

    def stream_chat(self, request: RAGRequest, model: str | None = None) -> Iterator[dict]:
        """The ``chat.completion.chunk`` objects of a streamed answer, usage chunk included."""
        body = dict(chat_body(request, model), stream=True, stream_options={"include_usage": True})
        with httpx.stream(
            "POST", f"{self.base_url}/v1/chat/completions", json=body, timeout=self.timeout
        ) as r:
            if r.status_code != 200:
                r.read()
                _checked(r)
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: ") :])
                if "error" in chunk:
                    raise ServerError(_message(chunk))
                yield chunk

    def _post(self, path: str, body: dict) -> dict:
        return _checked(httpx.post(f"{self.base_url}{path}", json=body, timeout=self.timeout))


def chat_body(request: RAGRequest, model: str | None) -> dict[str, Any]:
    """``request`` as a chat completions body (what ``ChatCompletionRequest.to_request`` reads
    back). Of its ``blend`` only the ratio travels: the rest is the server's engine's."""
    sampling = request.sampling
    body = {
        "messages": [{"role": "user", "content": request.question}],
        "max_tokens": sampling.max_new_tokens,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "seed": sampling.seed,
        "stop": list(sampling.stop) or None,
        "mode": request.mode,
        "top_k": request.top_k,
        "recompute_ratio": None if request.blend is None else request.blend.recompute_ratio,
        "documents": None if request.chunks is None else list(request.chunks),
        "model": model,
    }
    return {key: value for key, value in body.items() if value is not None}


def _checked(response: httpx.Response) -> dict:
    try:
        body = response.json()
    except json.JSONDecodeError:
        body = {}
    if response.status_code != 200:
        raise ServerError(f"HTTP {response.status_code}: {_message(body) or response.text[:200]}")
    return body


def _message(body: dict) -> str:
    error = body.get("error") or {}
    return f"{error.get('message', '')} (request id {error.get('request_id', '-')})" if error else ""
