"""TTFT when chunk KV comes from local memory, from Redis, or is recomputed, side by side.

    python -m bench.kv_tiers --index-dir INDEX --redis redis://127.0.0.1:6379/0 --repeats 3 \
        --out runs/kv_tiers.json

For each sample question the top-k chunks are retrieved once; then, in turn for every question
and repeat, the same blend prefill runs with chunk KV (a) in an in-process memory store, (b) in
Redis only (one MGET per prompt, then decoding the blobs), (c) in no store at all (computed for
the request, as after an eviction or while Redis is down). ``full`` prefill is the reference.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from blendrag import BlendEngine
from blendrag.retriever import Retriever
from blendrag.store import MemoryStore, RedisStore, TieredStore
from harness.data import sample_questions
from harness.report import write_json
from harness.stats import summarize


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.kv_tiers", description=__doc__.splitlines()[0])
    p.add_argument("--index-dir", type=Path, required=True)
    p.add_argument("--redis", required=True, help="redis:// URL of a server to use (its keys get a prefix)")
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--n", type=int, default=12, help="questions from samples/questions.json")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)

    questions = sample_questions()[: args.n]
    retriever = Retriever(args.index_dir)
    prompts = [(q, [c.text for c in retriever.search(q, args.top_k)]) for q in questions]
    remote = RedisStore(args.redis, prefix="blendrag:kv-tiers:")
    stores = {
        "memory": MemoryStore(8 << 30),
        "redis": TieredStore([remote], names=["redis"]),
        "recompute": MemoryStore(0),  # keeps nothing: every chunk is computed for the request
    }
    base = BlendEngine.from_pretrained(store=stores["memory"])
    engines = {name: base.with_store(store) for name, store in stores.items()}  # one model for all
    for name in ("memory", "redis"):  # fill both stores before any timing
        for question, chunks in prompts:
            engines[name].prefill(chunks, question)
    variants = [("full", "memory", "full"), *((name, name, "blend") for name in stores)]
    ttft: dict[str, list[float]] = {name: [] for name, _, _ in variants}
    hits: dict[str, int] = {name: 0 for name, _, _ in variants}
    for _ in range(args.repeats):
        for question, chunks in prompts:
            for name, store, mode in variants:  # interleaved: load changes hit every variant alike
                stats = engines[store].prefill(chunks, question, mode=mode).stats
                ttft[name].append(stats.ttft_s)
                hits[name] += stats.cache_hits
    result = {
        "prompts": len(prompts),
        "repeats": args.repeats,
        "mean_prompt_tokens": statistics.fmean(len(base.prompt_format.build(c, q).ids) for q, c in prompts),
        "ttft_s": {name: summarize(values) for name, values in ttft.items()},
        "chunk_hits": hits,
        "redis_unavailable": remote.stats["unavailable"],
    }
    print(json.dumps(result, indent=2))
    if args.out:
        write_json(args.out, result, indent=2)
    return result


if __name__ == "__main__":
    main()
