"""bench.load for a few seconds against a real uvicorn server (tiny model)."""

from __future__ import annotations

import asyncio
import os

import pytest
from test_api_server import QUESTIONS, ServerThread

from bench.load import Settings, run_load
from blendrag.api.app import create_app


def test_short_load_run_has_no_errors_and_matches_sequential_answers(tiny_engine, new_sample_index):
    app = create_app(tiny_engine, new_sample_index("load-index"), model_name="tiny")
    with ServerThread(app) as server:
        settings = Settings(
            server.url,
            clients=6,
            duration_s=4,
            mode="blend",
            max_tokens=6,
            mix={"query": 0.5, "stream": 0.4, "add": 0.1},
            server_pid=os.getpid(),
        )
        result = asyncio.run(run_load(settings, QUESTIONS))
    assert result["requests"] > 6 and result["server_errors"] == 0 and result["errors"] == {}
    assert result["by_kind"]["query"] and result["by_kind"]["stream"]
    assert result["mismatches"] == [] and result["distinct_prompts_checked"] >= 2
    assert result["latency_s"]["all"]["p99"] >= result["latency_s"]["all"]["p50"] > 0
    assert result["server_rss_mb"]["samples"] >= 4 and result["server_rss_mb"]["max"] > 0
    assert result["ttft_histogram"]["blend"]["count"] >= result["by_kind"]["query"]


def test_refuses_a_non_loopback_url():
    with pytest.raises(ValueError, match="only loopback"):
        asyncio.run(run_load(Settings("http://example.com", 1, 1, "blend"), ["q"]))
