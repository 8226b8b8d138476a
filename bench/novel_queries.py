"""A long stream of novel queries over a corpus whose KV is several times the memory tier: hit
rate, TTFT speedup over full prefill and store bytes against query number.

    flock /tmp/blendrag-cpu.lock .venv/bin/python -m bench.novel_queries \\
        --dataset ../shared/data/musique_dev.json --queries 500 --out runs/novel-queries.json \\
        --plot docs/novel-queries.png

The corpus is the dataset's distinct passages, precomputed once into a disk store (as an index
build does). Each query is one of the dataset's questions over ``--top-k`` passages drawn at random
(a new mix and order every time) and is answered by a blend prefill on a memory tier of
``--memory-share`` of the corpus's KV in front of the disk tier. Two settings: ``fits`` (the disk
holds the whole corpus) and ``over-budget`` (the disk's byte budget is ``--budget-share`` of it,
so least recently used entries are evicted and recomputed when asked for again). Every
``--full-every``-th query is also prefilled in full, side by side, for the speedup.
"""

from __future__ import annotations

import argparse
import random
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from blendrag import BlendEngine
from blendrag.store import DiskStore, MemoryStore, TieredStore
from blendrag.store.formats import DEFAULT_FORMAT
from harness.data import DEFAULT_DATASET, chunk_text, load_dataset
from harness.report import settings, write_json

SETTINGS = ("fits", "over-budget")


def corpus_of(items: list[dict[str, Any]], limit: int | None) -> list[str]:
    """The distinct passages of ``items``, in order of first appearance."""
    texts = dict.fromkeys(chunk_text(ctx) for item in items for ctx in item["ctxs"])
    return list(texts)[:limit]


def run_stream(
    engine: BlendEngine, corpus: list[str], questions: list[str], args: argparse.Namespace
) -> list[dict[str, Any]]:
    """One record per query: hits, misses, blend TTFT, store bytes (and full TTFT when sampled)."""
    rng, disk = random.Random(args.seed), engine.store.tiers[1]
    records = []
    for i in range(args.queries):
        chunks, question = rng.sample(corpus, args.top_k), questions[i % len(questions)]
        blend = engine.prefill(chunks, question, mode="blend")
        record = {
            "query": i,
            "hits": blend.stats.cache_hits,
            "misses": blend.stats.cache_misses,
            "blend_ttft_s": blend.stats.ttft_s,
            "memory_bytes": engine.store.tiers[0].nbytes(),
            "disk_bytes": disk.nbytes(),
        }
        if i % args.full_every == 0:
            record["full_ttft_s"] = engine.prefill(chunks, question, mode="full").stats.ttft_s
        records.append(record)
    return records


def summarize(records: list[dict[str, Any]], window: int) -> dict[str, Any]:
    """Hit rate per window of queries, and overall figures."""
    hits = [r["hits"] for r in records]
    asked = [r["hits"] + r["misses"] for r in records]
    windows = [sum(hits[i : i + window]) / sum(asked[i : i + window]) for i in range(0, len(records), window)]
    sampled = [r for r in records if "full_ttft_s" in r]
    return {
        "hit_rate": sum(hits) / sum(asked),
        "hit_rate_per_window": windows,
        "window": window,
        "speedup_mean": sum(r["full_ttft_s"] / r["blend_ttft_s"] for r in sampled) / len(sampled),
        "blend_ttft_mean_s": sum(r["blend_ttft_s"] for r in records) / len(records),
        "full_ttft_mean_s": sum(r["full_ttft_s"] for r in sampled) / len(sampled),
        "max_disk_bytes": max(r["disk_bytes"] for r in records),
    }


def run_setting(
    name: str,
    disk_dir: Path,
    corpus_bytes: int,
    corpus: list[str],
    questions: list[str],
    loaded: Any,
    args: argparse.Namespace,
) -> dict[str, Any]:
    budget = None if name == "fits" else int(corpus_bytes * args.budget_share)
    memory = MemoryStore(int(corpus_bytes * args.memory_share))
    store = TieredStore([memory, DiskStore(disk_dir, max_bytes=budget)], names=["memory", "disk"])
    engine = BlendEngine(loaded, store, kv_format=args.kv_format)
    engine.prefill(corpus[:1], questions[0], mode="blend")  # warm-up: lazy init, the prefix segment
    records = run_stream(engine, corpus, questions, args)
    return {
        "setting": name,
        "memory_bytes": memory.capacity_bytes,
        "disk_budget_bytes": budget,
        "store_stats": dict(store.stats),
        "summary": summarize(records, args.window),
        "records": records,
    }


def plot(results: list[dict[str, Any]], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 8))
    FigureCanvasAgg(fig)
    axes = fig.subplots(3, 1, sharex=True)
    for result in results:
        records, label = result["records"], result["setting"]
        s = result["summary"]
        x = [i * s["window"] for i in range(len(s["hit_rate_per_window"]))]
        axes[0].plot(x, s["hit_rate_per_window"], marker="o", label=label)
        sampled = [r for r in records if "full_ttft_s" in r]
        axes[1].plot(
            [r["query"] for r in sampled],
            [r["full_ttft_s"] / r["blend_ttft_s"] for r in sampled],
            label=label,
        )
        axes[2].plot(
            [r["query"] for r in records], [r["disk_bytes"] / 2**20 for r in records], label=f"{label} disk"
        )
        if result["disk_budget_bytes"]:
            axes[2].axhline(
                result["disk_budget_bytes"] / 2**20, linestyle="--", color="grey", label=f"{label} budget"
            )
    axes[0].set_ylabel(f"chunk hit rate\n(per {results[0]['summary']['window']} queries)")
    axes[0].set_ylim(0, 1.05)
    axes[1].set_ylabel("TTFT speedup\nover full prefill")
    axes[2].set_ylabel("disk store MiB")
    axes[2].set_xlabel("query number")
    for ax in axes:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.novel_queries", description=__doc__.splitlines()[0])
    p.add_argument("--dataset", type=Path, default=DEFAULT_DATASET)
    p.add_argument("--passages", type=int, default=None, help="corpus size (default: every distinct passage)")
    p.add_argument("--queries", type=int, default=500)
    p.add_argument("--top-k", type=int, default=6)
    p.add_argument("--memory-share", type=float, default=0.2, help="memory tier / corpus KV bytes")
    p.add_argument(
        "--budget-share", type=float, default=0.5, help="disk budget / corpus KV bytes (over-budget)"
    )
    p.add_argument("--full-every", type=int, default=10, help="also prefill every N-th query in full")
    p.add_argument("--window", type=int, default=25, help="queries per hit-rate point")
    p.add_argument("--kv-format", default=DEFAULT_FORMAT)
    p.add_argument("--model", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=None, help="keep the store here (default: a temp dir)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--plot", type=Path, default=None, help="write the curves as a PNG")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.dataset.exists():
        print(f"skipped: no dataset at {args.dataset}")
        return 0
    from blendrag.engine import resolve_device
    from blendrag.loading import load_model

    items = load_dataset(args.dataset, None)
    corpus, questions = corpus_of(items, args.passages), [it["question"] for it in items]
    device, dtype = resolve_device(None, None)
    loaded = load_model(args.model, dtype)
    loaded.model.to(device)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="blendrag-novel-"))
    try:
        with torch.inference_mode():
            # The corpus's KV, computed once (as an index build does); the settings run in turn
            # on it, the unbounded one first (the bounded one evicts at open).
            source = BlendEngine(loaded, DiskStore(workdir / "kv"), kv_format=args.kv_format)
            start = time.perf_counter()
            source.precompute(corpus)
            source.prefill(corpus[:1], questions[0], mode="reuse")  # stores the prompt prefix's KV
            build_s, corpus_bytes = time.perf_counter() - start, source.store.nbytes()
            results = [
                run_setting(name, workdir / "kv", corpus_bytes, corpus, questions, loaded, args)
                for name in SETTINGS
            ]
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    for r in results:
        s = r["summary"]
        print(
            f"{r['setting']}: hit rate {s['hit_rate']:.3f} (windows {min(s['hit_rate_per_window']):.2f}-"
            f"{max(s['hit_rate_per_window']):.2f}), speedup {s['speedup_mean']:.2f}x, disk max "
            f"{s['max_disk_bytes'] / 2**20:.0f} MiB (budget {r['disk_budget_bytes']}), "
            f"stats {r['store_stats']}"
        )
    print(f"corpus: {len(corpus)} passages, {corpus_bytes / 2**20:.0f} MiB of KV, built in {build_s:.0f} s")
    if args.out:
        corpus_info = {"passages": len(corpus), "kv_bytes": corpus_bytes, "build_s": build_s}
        write_json(args.out, {"settings": settings(args), "corpus": corpus_info, "results": results})
    if args.plot:
        plot(results, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
