"""The engine under test, one variant's run on one question, and the loop that runs every
variant on every question with chunk KV precomputed before any timing."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from blendrag.stats import GenerationStats
from harness.answers import clean_answer
from harness.data import ChunkSource, Item
from harness.variants import Variant, parse_spec


@dataclass
class Backend:
    """The engine under test and the config that blend variants are derived from."""

    engine: Any  # BlendEngine, or any object with precompute / prefill / generate
    base_config: Any  # a BlendConfig (frozen dataclass)

    def config_for(self, variant: Variant) -> Any:
        if variant.mode != "blend":
            return None
        return dataclasses.replace(
            self.base_config, recompute_ratio=variant.ratio, **parse_spec(variant.selector)
        )


@dataclass
class Run:
    """What one variant produced on one question."""

    answer: str
    logits: torch.Tensor
    stats: GenerationStats


# What a caller keeps of one question: (item, its chunks, each variant's run by name) -> record.
RecordFn = Callable[[Item, list[str], dict[str, Run]], dict[str, Any]]


def load_backend(
    model: str | None,
    kv_store: str | None = None,
    chunk_context: str = "none",
    device: str | None = None,
    dtype: str | None = None,
    adapter: str | None = None,
) -> Backend:
    """The engine of ``model`` for a screen or a benchmark. ``adapter``: None, the screens' bare
    engine (``eval.fidelity --adapter`` scores one beside it); "auto" for the product's default."""
    # Imported here so that the harness (and its tests) load without the engine's heavy imports.
    from blendrag import BlendConfig, BlendEngine

    engine = BlendEngine.from_pretrained(
        path=model, store=kv_store, chunk_context=chunk_context, device=device, dtype=dtype, adapter=adapter
    )
    return Backend(engine, BlendConfig())


def run_variant(
    backend: Backend, chunks: list[str], question: str, variant: Variant, max_new_tokens: int
) -> Run:
    # The ratio goes both as argument and in the config so either precedence rule gives the same run.
    kwargs = {"mode": variant.mode, "recompute_ratio": variant.ratio, "config": backend.config_for(variant)}
    # TTFT and first-token logits are the prefill's, which generate reports.
    out = backend.engine.generate(chunks, question, max_new_tokens=max_new_tokens, temperature=0.0, **kwargs)
    return Run(clean_answer(out.text), out.first_logits, out.stats)


def precompute_all(engine: Any, chunk_lists: list[list[str]]) -> int:
    """Store every chunk's KV up front, so no timed prefill pays for a chunk it should find cached."""
    return sum(engine.precompute(chunks) for chunks in tqdm(chunk_lists, desc="precompute", unit="q"))


def run_questions(
    backend: Backend,
    items: list[Item],
    variants: list[Variant],
    chunk_source: ChunkSource,
    max_new_tokens: int,
    record: RecordFn,
    done: Sequence[dict[str, Any]] = (),
    on_record: Callable[[list[dict[str, Any]]], None] | None = None,
) -> list[dict[str, Any]]:
    """``record`` of every item, in order; on each question the variants run back to back.
    ``done`` are the records of a previous, interrupted run (its first items, which are not run
    again); ``on_record`` sees the list after each question."""
    records = list(done)
    chunk_lists = [chunk_source(item) for item in items]
    precompute_all(backend.engine, chunk_lists[len(records) :])
    if len(items) > len(records):
        # Warm-up (discarded), once per mode: a path's first call pays one-off costs (allocations,
        # lazy init) that would otherwise land on the first question's TTFT.
        first_of_mode: dict[str, Variant] = {}
        for variant in variants:
            first_of_mode.setdefault(variant.mode, variant)
        for variant in first_of_mode.values():
            run_variant(backend, chunk_lists[-1], items[-1]["question"], variant, 1)
    pairs = list(zip(items, chunk_lists, strict=True))[len(records) :]
    for item, chunks in tqdm(pairs, desc="questions", unit="q", initial=len(records), total=len(items)):
        runs = {v.name: run_variant(backend, chunks, item["question"], v, max_new_tokens) for v in variants}
        records.append(record(item, chunks, runs))
        if on_record:
            on_record(records)
    return records
