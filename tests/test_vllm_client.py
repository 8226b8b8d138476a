"""The client side of the vLLM connector (no vLLM needed): what a blended request carries, and
the connector's report that comes back."""

from __future__ import annotations

import json

from blendrag.vllm import blend_request
from blendrag.vllm.client import BlendReport, blend_report

CHUNKS = ["The lighthouse was built in 1871.", "Its lamp came from Paris."]


def test_the_cache_salt_differs_whenever_the_blended_kv_may_differ(tiny_engine):
    fmt = tiny_engine.prompt_format
    base = blend_request(fmt, CHUNKS, "Who built it?", recompute_ratio=0.15)
    same = blend_request(fmt, CHUNKS, "Who built it?", recompute_ratio=0.15)
    others = [
        blend_request(fmt, CHUNKS, "When was it built?", recompute_ratio=0.15),  # query-aware selection
        blend_request(fmt, CHUNKS, "Who built it?", recompute_ratio=0.3),
        blend_request(fmt, CHUNKS[::-1], "Who built it?", recompute_ratio=0.15),
        blend_request(fmt, CHUNKS, "Who built it?", recompute_ratio=0.15, fingerprint="other"),
    ]
    assert same.cache_salt == base.cache_salt and same.prompt_token_ids == base.prompt_token_ids
    assert len({base.cache_salt, *(o.cache_salt for o in others)}) == 1 + len(others)
    assert base.completions_body()["cache_salt"] == base.tokens_prompt()["cache_salt"] == base.cache_salt


def test_the_connectors_report_comes_back_from_kv_transfer_params():
    report = BlendReport(n_written=10, n_recomputed=3, compute_fraction=0.25, cache_hits=2)
    params = json.loads(json.dumps(report.to_params()))  # plain values, as vLLM hands them over
    assert blend_report(params) == report
    assert blend_report(None) is None and blend_report({"other": 1}) is None
