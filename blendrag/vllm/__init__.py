"""blendrag inside an unmodified vLLM: a KV connector (``connector``) and the client side that
builds its requests (``client``). Only ``connector`` imports vLLM."""

from blendrag.vllm.client import BlendRequest, blend_request

__all__ = ["BlendRequest", "blend_request"]
