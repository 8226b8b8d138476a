"""The request a client sends to a vLLM running ``BlendConnector``.

The connector can only reuse chunk KV when the prompt's token ids are exactly the ids blendrag's
``PromptFormat`` builds (each segment tokenized alone), so the client sends token ids, never text
that vLLM would tokenize as a whole. The chunk structure travels in ``kv_transfer_params``, and a
``cache_salt`` unique to the blend keeps the (approximate) blended KV out of vLLM's prefix cache
for any other request.

What the connector did for a request comes back in ``RequestOutput.kv_transfer_params``
(``blend_report``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

from blendrag.prompt import PromptFormat

REPORT_KEY = "blendrag"  # the connector's entry in a finished request's kv_transfer_params


@dataclass(frozen=True)
class BlendRequest:
    prompt_token_ids: list[int]
    kv_transfer_params: dict[str, Any]
    cache_salt: str

    def tokens_prompt(self) -> dict[str, Any]:
        """For ``LLM.generate``: a ``TokensPrompt`` (a plain dict)."""
        return {"prompt_token_ids": self.prompt_token_ids, "cache_salt": self.cache_salt}

    def extra_args(self) -> dict[str, Any]:
        """For ``SamplingParams(extra_args=...)``."""
        return {"kv_transfer_params": self.kv_transfer_params}

    def completions_body(self) -> dict[str, Any]:
        """For vLLM's OpenAI ``/v1/completions``: merge into the JSON body (or ``extra_body``)."""
        return {
            "prompt": self.prompt_token_ids,
            "kv_transfer_params": self.kv_transfer_params,
            "cache_salt": self.cache_salt,
        }


def blend_request(
    prompt_format: PromptFormat,
    chunks: list[str],
    question: str,
    *,
    recompute_ratio: float | None = None,
    fingerprint: str | None = None,
) -> BlendRequest:
    """Token ids and connector parameters for one RAG prompt.

    ``recompute_ratio`` overrides the connector's configured ratio for this request.
    ``fingerprint`` (the ``BlendEngine.fingerprint`` the client built the prompt for) makes the
    connector refuse the request, and vLLM prefill it normally, when vLLM serves another model.
    """
    params: dict[str, Any] = {"chunks": list(chunks), "question": question}
    if recompute_ratio is not None:
        params["recompute_ratio"] = recompute_ratio
    if fingerprint is not None:
        params["fingerprint"] = fingerprint
    return BlendRequest(prompt_format.build(chunks, question).ids, params, blend_salt(params))


def blend_salt(kv_transfer_params: dict[str, Any]) -> str:
    """A ``cache_salt`` unique to the blend: the blended KV of every chunk depends on the other
    chunks, the question (query-aware selection) and the ratio, so vLLM's prefix cache may hand
    it only to a request with exactly these parameters, for which it is exactly right."""
    digest = hashlib.sha256(json.dumps(kv_transfer_params, sort_keys=True).encode()).hexdigest()
    return f"blendrag-{digest[:32]}"


@dataclass(frozen=True)
class BlendReport:
    """What the connector did for one request: the blend's ``PrefillStats`` counts (see
    ``blendrag.stats``), or the error that made vLLM prefill the prompt itself instead."""

    n_written: int = 0  # prompt positions whose KV the connector wrote into vLLM's cache
    n_recomputed: int | None = None
    compute_fraction: float | None = None
    cache_hits: int = 0
    cache_misses: int = 0
    load_stall_s: float | None = None
    blend_s: float | None = None  # the blend's time in vLLM's worker, before the step's forward pass
    error: str | None = None  # the blend failed: vLLM recomputed the prompt

    def to_params(self) -> dict[str, Any]:
        """As ``request_finished`` returns it (plain values: vLLM serializes it to the client)."""
        return {REPORT_KEY: asdict(self)}


def blend_report(kv_transfer_params: dict[str, Any] | None) -> BlendReport | None:
    """The connector's report from a finished ``RequestOutput.kv_transfer_params``. None when the
    connector planned no load for the request (a fallback, or a repeat vLLM's prefix cache served),
    and when the request ended before the report reached vLLM's scheduler: in the step that
    blended it (its first token was its last) or at a stop string vLLM's front end detected."""
    report = (kv_transfer_params or {}).get(REPORT_KEY)
    return None if report is None else BlendReport(**report)
