"""Load + decode time of a prompt's chunk KV in each stored format, from disk and from Redis,
side by side in one run.

    flock /tmp/blendrag-cpu.lock .venv/bin/python -m bench.kv_load \\
        --dataset ../shared/data/musique_dev.json --redis redis://127.0.0.1:6379/0 --out runs/kv-load.json

The first question's ``--top-k`` passages are computed once (fp32) and quantized into every
format; each format's entries are written to a disk store and to Redis, then read back whole
(``get_many``: read, checksum, decode into tensors) ``--repeats`` times, formats interleaved.
The disk reads hit the page cache (the entries were just written): what is timed is the store's
own work, which is what a format changes; a cold read adds the device's time for the bytes.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from blendrag import BlendEngine
from blendrag.store import ChunkKV, DiskStore, KVStore, MemoryStore, codec
from blendrag.store.formats import FORMATS, get_format
from harness.data import DEFAULT_DATASET, dataset_chunks, load_dataset
from harness.report import settings, write_json


def chunk_kv(model: str | None, chunks: list[str]) -> list[ChunkKV]:
    engine = BlendEngine.from_pretrained(model, store=MemoryStore(1 << 40), kv_format="fp32")
    engine.precompute(chunks)
    return [engine.store.get(engine.chunk_kv.key(text)) for text in chunks]


def entry_key(fmt: str, chunk: int) -> str:
    return f"bench-{fmt.replace('.', '_')}-{chunk}"  # store keys allow no dots


def time_reads(store: KVStore, keys: list[str]) -> float:
    start = time.perf_counter()
    out = store.get_many(keys)
    elapsed = time.perf_counter() - start
    assert all(kv is not None for kv in out), "an entry went missing"
    return elapsed


def measure(kvs: list[ChunkKV], stores: dict[str, KVStore], formats: list[str], repeats: int) -> list[dict]:
    keys: dict[str, list[str]] = {}
    rows = {name: {"format": name, "bytes": 0} for name in formats}
    for name in formats:
        fmt = get_format(name)
        encoded = [ChunkKV(*fmt.quantize(kv.k, kv.v), fmt.tag) for kv in kvs]
        keys[name] = [entry_key(name, i) for i in range(len(kvs))]
        rows[name]["bytes"] = sum(len(codec.encode(kv)) for kv in encoded)
        for store in stores.values():
            for key, kv in zip(keys[name], encoded, strict=True):
                store.put(key, kv)
    samples = {(name, tier): [] for name in formats for tier in stores}
    for _ in range(repeats):
        for name in formats:
            for tier, store in stores.items():
                samples[name, tier].append(time_reads(store, keys[name]))
    for (name, tier), seconds in samples.items():
        rows[name][f"{tier}_ms"] = 1000 * statistics.median(seconds)
    return list(rows.values())


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.kv_load", description=__doc__.splitlines()[0])
    p.add_argument("--dataset", type=Path, default=DEFAULT_DATASET)
    p.add_argument("--top-k", type=int, default=6)
    p.add_argument("--formats", default=",".join([*FORMATS, "cachegen-8.8.8"]))
    p.add_argument("--redis", default=None, help="redis:// URL of a server to use (keys get a prefix)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--model", default=None)
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.dataset.exists():
        print(f"skipped: no dataset at {args.dataset}")
        return 0
    formats = [get_format(name).tag for name in args.formats.split(",")]
    item = load_dataset(args.dataset, 1)[0]
    with torch.inference_mode():
        kvs = chunk_kv(args.model, dataset_chunks(args.top_k)(item))
    n_tokens = sum(kv.n_tokens for kv in kvs)
    with tempfile.TemporaryDirectory(prefix="blendrag-kv-load-") as tmp:
        stores: dict[str, Any] = {"disk": DiskStore(tmp)}
        if args.redis:
            from blendrag.store import RedisStore

            stores["redis"] = RedisStore(args.redis, prefix="blendrag-bench-kv-load:")
        rows = measure(kvs, stores, formats, args.repeats)
        if args.redis:
            for name in formats:
                for i in range(len(kvs)):
                    stores["redis"].delete(entry_key(name, i))
    base = next(r["bytes"] for r in rows if r["format"] == "fp32") if "fp32" in formats else None
    print(f"{len(kvs)} chunks, {n_tokens} tokens; ms to read and decode them all (median of {args.repeats})")
    for r in rows:
        ratio = f" ({base / r['bytes']:.2f}x smaller)" if base else ""
        times = ", ".join(f"{tier} {r[f'{tier}_ms']:.1f} ms" for tier in stores)
        print(f"{r['format']}: {r['bytes'] / n_tokens:,.0f} bytes/token{ratio}; {times}")
    if args.out:
        write_json(args.out, {"settings": settings(args), "n_tokens": n_tokens, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
