"""Index build throughput and query latency on MuSiQue passages used as a corpus (issue 3).

    flock /tmp/blendrag-cpu.lock .venv/bin/python -m bench.index_throughput \\
        --dataset ../shared/data/musique_dev.json --passages 1000 --out runs/index_throughput.json

The passages (title + text, the 10 ctxs of each question in order) are written to a temporary
``.jsonl`` file and indexed with ``build_index`` into a temporary index directory, KV on disk
beside it. Reported: chunks/s and tokens/s of the whole build and of its KV part (the engine's
``precompute``, store writes included), against the raw prefill throughput of the same model on
the same tokens (a transformers forward, SDPA, fp32, of each distinct chunk alone, or of an evenly
spaced ``--raw-sample`` of them: the rate is per token, the sample halves a large run); KV bytes per
token on disk; and per query the latency split into retrieval, KV load (``store.get`` of the
retrieved chunks, from disk into the memory tier of a fresh store), blend (``engine.prefill``
with that KV in memory) and first token (sampling and detokenizing it). With ``--resume``, the
same corpus is indexed again by ``blendrag index`` into a second directory, killed (SIGKILL) once
half its chunks have KV, and the same command run again: its time to a complete index against
the uninterrupted build's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from blendrag import BlendEngine
from blendrag.retriever import Retriever, build_index
from blendrag.retriever.docstore import DB_NAME
from blendrag.retriever.embedder import Embedder
from blendrag.retriever.index_dir import KV_DIR_NAME, IndexDir
from blendrag.retriever.indexer import index_stats
from blendrag.store import open_store
from blendrag.store.formats import DEFAULT_FORMAT
from harness.data import DEFAULT_DATASET, load_dataset, write_corpus
from harness.report import write_json
from harness.timing import Timed


def measure_build(corpus: Path, index_dir: Path, engine: BlendEngine) -> dict[str, Any]:
    engine.precompute = Timed(engine.precompute)  # instance attribute: the indexer calls it
    embedder = Embedder()
    embedder.embed = Timed(embedder.embed)
    start = time.perf_counter()
    counts = build_index([corpus], index_dir, engine, embedder=embedder)
    build_s = time.perf_counter() - start
    stats = index_stats(index_dir)
    chunks, tokens = stats["chunks"], stats["tokens"]
    kv_s, embed_s = engine.precompute.seconds, embedder.embed.seconds
    return {
        "counts": counts,
        "chunks": chunks,
        "tokens": tokens,
        "build_s": build_s,
        "build_chunks_per_s": chunks / build_s,
        "build_tokens_per_s": tokens / build_s,
        "kv_s": kv_s,
        "embed_s": embed_s,
        "other_s": build_s - kv_s - embed_s,
        "kv_bytes_on_disk": stats["kv_bytes"],
    }


def measure_resume(
    corpus: Path, index_dir: Path, model: str | None, kv_format: str, n_chunks: int
) -> dict[str, Any]:
    """Kill a ``blendrag index`` run once half the ``n_chunks`` chunks of ``corpus`` have KV (the
    index learns its chunks batch by batch: its own count is not the total until the end), then resume it."""
    cmd = [sys.executable, "-m", "blendrag.cli", "index", str(corpus), "--index-dir", str(index_dir)]
    cmd += ["--kv-format", kv_format, *(["--model", model] if model else [])]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None:
        time.sleep(0.5)
        if _kv_progress(index_dir)[1] >= n_chunks // 2:
            proc.kill()
            break
    proc.wait()
    killed_s = time.perf_counter() - start
    _, done_at_kill = _kv_progress(index_dir)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    resume_s = time.perf_counter() - start
    total, done = _kv_progress(index_dir)
    return {
        "killed_after_s": killed_s,
        "chunks_with_kv_at_kill": done_at_kill,
        "resume_s": resume_s,
        "chunks": total,
        "complete": total == done,
    }


def _kv_progress(index_dir: Path) -> tuple[int, int]:
    """(chunks, chunks with KV) of an index being built; (0, 0) before it has any."""
    try:
        with sqlite3.connect(f"file:{index_dir / DB_NAME}?mode=ro", uri=True, timeout=5) as db:
            return db.execute("SELECT COUNT(*), COALESCE(SUM(kv_done), 0) FROM chunks").fetchone()
    except sqlite3.OperationalError:  # not created yet, or no table yet
        return 0, 0


def distinct_chunks(index_dir: Path) -> list[tuple[str, int]]:
    """(text, n_tokens) of each distinct KV entry: identical texts share one entry."""
    with IndexDir(index_dir) as index:
        rows = index.docstore.db.execute(
            "SELECT MIN(text), MIN(n_tokens) FROM chunks GROUP BY kv_key ORDER BY MIN(id)"
        ).fetchall()
    return [(text, n) for text, n in rows]


@torch.inference_mode()
def raw_prefill(model_dir: Path, engine: BlendEngine, texts: list[str]) -> dict[str, Any]:
    """transformers forward (SDPA, fp32) of each chunk's token ids alone, as the engine tokenizes them."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa", dtype=torch.float32)
    model.eval()
    ids = [torch.tensor([engine.prompt_format.chunk_ids(t)]) for t in texts]
    model(ids[0], use_cache=False, logits_to_keep=1)  # warm-up, discarded
    start = time.perf_counter()
    for x in ids:
        model(x, use_cache=False, logits_to_keep=1)
    seconds = time.perf_counter() - start
    tokens = sum(x.shape[1] for x in ids)
    return {
        "what": "transformers AutoModelForCausalLM forward, sdpa, fp32, each distinct chunk alone",
        "chunks": len(ids),
        "tokens": tokens,
        "seconds": seconds,
        "chunks_per_s": len(ids) / seconds,
        "tokens_per_s": tokens / seconds,
    }


def query_once(retriever: Retriever, engine: BlendEngine, question: str, top_k: int) -> dict[str, float]:
    t0 = time.perf_counter()
    texts = [c.text for c in retriever.search(question, top_k)]
    t1 = time.perf_counter()
    for text in texts:  # disk -> memory tier; the prefill below then finds the KV in memory
        engine.store.get(engine.chunk_kv.key(text))
    t2 = time.perf_counter()
    pre = engine.prefill(texts, question, mode="blend")
    t3 = time.perf_counter()
    engine.tokenizer.decode([int(pre.logits.argmax())])
    t4 = time.perf_counter()
    return {
        "retrieval_s": t1 - t0,
        "kv_load_s": t2 - t1,
        "blend_s": t3 - t2,
        "first_token_s": t4 - t3,
        "total_s": t4 - t0,
        "n_tokens": pre.stats.n_tokens,
        "n_recomputed": pre.stats.n_recomputed,
        "cache_hits": pre.stats.cache_hits,
        "cache_misses": pre.stats.cache_misses,
    }


def measure_queries(
    index_dir: Path, model: str | None, questions: list[str], warmup: str, top_k: int, kv_format: str
) -> dict[str, Any]:
    # A fresh engine and store: its memory tier is empty, so KV comes from the disk tier.
    store = open_store(str(index_dir / KV_DIR_NAME))
    engine = BlendEngine.from_pretrained(model, store=store, kv_format=kv_format)
    retriever = Retriever(index_dir)
    try:
        query_once(retriever, engine, warmup, top_k)  # discarded: lazy init, the prefix's segment
        runs = [query_once(retriever, engine, q, top_k) for q in questions]
    finally:
        retriever.close()
    keys = [k for k in runs[0] if k.endswith("_s")] if runs else []
    return {
        "top_k": top_k,
        "mean": {k: statistics.fmean(r[k] for r in runs) for k in keys},
        "runs": runs,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.index_throughput", description=__doc__.splitlines()[0])
    p.add_argument("--dataset", type=Path, default=DEFAULT_DATASET)
    p.add_argument("--passages", type=int, default=1000, help="ctxs used as the corpus (10 per question)")
    p.add_argument("--queries", type=int, default=5, help="questions whose latency is split")
    p.add_argument("--top-k", type=int, default=6)
    p.add_argument("--model", default=None, help="local checkpoint dir (default: the embedded model)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument(
        "--kv-format", default=DEFAULT_FORMAT, help="how chunk KV is stored (default: %(default)s)"
    )
    p.add_argument(
        "--raw-sample",
        type=int,
        default=0,
        help="raw prefill of about this many distinct chunks, evenly spaced (default: all)",
    )
    p.add_argument("--resume", action="store_true", help="also time resuming a killed build")
    p.add_argument(
        "--workdir", type=Path, default=None, help="keep the index here (default: a temp dir, removed)"
    )
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.dataset.exists():
        print(f"skipped: no dataset at {args.dataset}")
        return 0
    torch.set_num_threads(args.threads)
    items = load_dataset(args.dataset, None)
    if args.queries + 1 > len(items):
        raise SystemExit(f"error: --queries {args.queries} needs {args.queries + 1} questions in the dataset")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="blendrag-index-bench-"))
    try:
        corpus, index_dir = workdir / "corpus.jsonl", workdir / "index"
        n_passages = write_corpus(items, corpus, limit=args.passages)
        engine = BlendEngine.from_pretrained(
            args.model, store=open_store(str(index_dir / KV_DIR_NAME)), kv_format=args.kv_format
        )
        build = measure_build(corpus, index_dir, engine)
        chunks = distinct_chunks(index_dir)
        distinct_tokens = sum(n for _, n in chunks)
        build["distinct_chunks"], build["distinct_tokens"] = len(chunks), distinct_tokens
        build["kv_bytes_per_token"] = build["kv_bytes_on_disk"] / distinct_tokens
        # Identical passages share one KV entry: the KV part computes each distinct chunk once.
        build["kv_chunks_per_s"] = len(chunks) / build["kv_s"]
        build["kv_tokens_per_s"] = distinct_tokens / build["kv_s"]
        step = max(1, len(chunks) // args.raw_sample) if args.raw_sample else 1
        raw = raw_prefill(engine.model_path, engine, [t for t, _ in chunks[::step]])
        questions = [it["question"] for it in items[: args.queries]]
        queries = measure_queries(
            index_dir, args.model, questions, items[args.queries]["question"], args.top_k, args.kv_format
        )
        resume = (
            measure_resume(corpus, workdir / "resumed", args.model, args.kv_format, build["chunks"])
            if args.resume
            else None
        )
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    report = {
        "settings": {**{k: str(v) for k, v in vars(args).items()}, "passages_indexed": n_passages},
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "build": build,
        "raw_prefill": raw,
        "kv_vs_raw_tokens_per_s": build["kv_tokens_per_s"] / raw["tokens_per_s"],
        "queries": queries,
        "resume": resume,
    }
    print(json.dumps({k: v for k, v in report.items() if k != "queries"}, indent=1))
    print(json.dumps(queries["mean"], indent=1))
    if args.out:
        write_json(args.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
