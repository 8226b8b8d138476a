"""The cap on answers in flight: over it a request waits for a slot, and every way an answer can
end (read to the end, closed by a client gone, dropped unread, failed prefill) frees its slot."""

from __future__ import annotations

import asyncio
import gc

import pytest

from blendrag.api.blocking import BlockingStream
from blendrag.api.rag import EngineFailure, InFlightLimit, RAGService
from blendrag.request import RAGRequest, SamplingParams

ASK = RAGRequest(
    "Who built the lighthouse?",
    chunks=("The lighthouse was built by Hilde Marsk in 1871.",),
    sampling=SamplingParams(max_new_tokens=8),
)


async def _read(stream) -> str:
    async for _ in stream:
        pass
    return stream.answer.generation.text


@pytest.mark.asyncio
async def test_a_request_over_the_limit_waits_until_an_answer_ends(tiny_engine):
    service = RAGService(tiny_engine, limit=InFlightLimit(1))
    first = await service.stream(ASK)
    assert first.answer is None  # still decoding: it holds the only slot
    second = asyncio.create_task(service.stream(ASK))
    await asyncio.sleep(0.3)
    assert not second.done()
    text = await _read(first)
    assert await _read(await asyncio.wait_for(second, 60)) == text


@pytest.mark.asyncio
@pytest.mark.parametrize("end", ["close", "drop"])
async def test_an_answer_closed_or_dropped_unread_frees_its_slot(tiny_engine, end):
    service = RAGService(tiny_engine, limit=InFlightLimit(1))
    first = await service.stream(ASK)
    if end == "close":  # what a client that disconnects mid-stream causes
        first.close()
    else:
        del first
        gc.collect()
    await _read(await asyncio.wait_for(service.stream(ASK), 60))


@pytest.mark.asyncio
async def test_a_failed_prefill_frees_its_slot(tiny_engine, monkeypatch):
    service = RAGService(tiny_engine, limit=InFlightLimit(1))
    with monkeypatch.context() as patch:
        patch.setattr(tiny_engine, "prefill", lambda *a, **k: 1 / 0)
        with pytest.raises(EngineFailure):
            await service.stream(ASK)
    await _read(await asyncio.wait_for(service.stream(ASK), 60))


def test_sync_callers_share_the_limit(tiny_engine):
    limit = InFlightLimit(1)
    service = RAGService(tiny_engine, limit=limit)
    stream = BlockingStream(service, ASK)
    assert not limit._slots.acquire(blocking=False)
    "".join(stream)
    assert limit._slots.acquire(blocking=False)


def test_limit_must_be_positive():
    with pytest.raises(ValueError, match=">= 1"):
        InFlightLimit(0)
