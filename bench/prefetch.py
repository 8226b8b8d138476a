"""How much of the chunk-KV load a background, layer-by-layer load hides behind compute.

    python -m bench.prefetch [--dataset ../shared/data/musique_dev.json] [--n 4] [--repeats 3] \\
        [--cold] [--out runs/prefetch.json]

Chunk KV lives in a disk store only. For each question, side by side: the load on its own (store
reads and RoPE re-alignment of a foreground load, from the engine's profiler labels), blend's
median TTFT with the load in the foreground (``prefetch=False``) and in the background
(``prefetch=True``), and how long the background load left the layer loop waiting
(``load_stall_s``). Hidden share = 1 - stall / load time; the TTFT difference says whether the
loader thread, which shares the CPU with compute, costs more than it hides.
``--cold`` evicts the question's KV files from the page cache before every prefill
(``posix_fadvise(DONTNEED)``), so that the reads come from the disk, not from memory.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

from torch.profiler import ProfilerActivity, profile

from bench.profile_blend import phase_ms
from blendrag import BlendEngine
from blendrag.stats import PrefillStats
from blendrag.store import DiskStore
from harness.data import DEFAULT_DATASET, load_prompts
from harness.report import settings, write_json

LOAD_PHASES = ("blendrag.store_read", "blendrag.realign")


def evict(store: DiskStore, engine: BlendEngine, chunks: list[str]) -> None:
    """Drop the chunks' KV files from the page cache (clean pages: no privileges needed)."""
    for chunk in chunks:
        fd = os.open(store.path(engine.chunk_kv.key(chunk)), os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def measure(
    engines: dict[str, BlendEngine],
    store: DiskStore,
    chunks: list[str],
    question: str,
    cold: bool,
    repeats: int,
) -> dict[str, float]:
    def prefill(name: str) -> PrefillStats:
        if cold:
            evict(store, engines[name], chunks)
        return engines[name].prefill(chunks, question, mode="blend").stats

    if cold:
        evict(store, engines["foreground"], chunks)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        engines["foreground"].prefill(chunks, question, mode="blend")
    phases = phase_ms(prof.events())
    load_s = sum(phases[name] for name in LOAD_PHASES) / 1e3
    # Alternate the order so that neither side always runs on a warmer machine.
    stats: dict[str, list[PrefillStats]] = {"foreground": [], "background": []}
    for i in range(repeats):
        for name in ("foreground", "background")[:: 1 if i % 2 == 0 else -1]:
            stats[name].append(prefill(name))
    fg, bg = (statistics.median(s.ttft_s for s in stats[name]) for name in ("foreground", "background"))
    stall = statistics.median(s.load_stall_s for s in stats["background"])
    return {
        "load_s": load_s,
        "ttft_foreground_s": fg,
        "ttft_background_s": bg,
        "stall_s": stall,
        "hidden": 1 - stall / load_s,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.prefetch", description=__doc__.splitlines()[0])
    p.add_argument("--dataset", type=Path, default=DEFAULT_DATASET)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--top-k", type=int, default=6)
    p.add_argument("--model", default=None, help="local checkpoint dir (default: the embedded model)")
    p.add_argument("--kv-dir", type=Path, default=None, help="disk store directory (default: a temp dir)")
    p.add_argument("--repeats", type=int, default=3, help="prefills per side and question (median)")
    p.add_argument("--cold", action="store_true", help="read KV from disk, not the page cache")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        store = DiskStore(args.kv_dir or tmp)
        engines = {
            name: BlendEngine.from_pretrained(args.model, store=store, prefetch=name == "background")
            for name in ("foreground", "background")
        }
        runs = []
        for chunks, question in load_prompts(args.dataset, args.n, args.top_k):
            engines["foreground"].precompute(chunks)
            engines["foreground"].prefill(chunks, question, mode="blend")  # warm-up
            runs.append(measure(engines, store, chunks, question, args.cold, args.repeats))
    summary = {key: statistics.mean(run[key] for run in runs) for key in runs[0]}
    summary["hidden_of_mean"] = 1 - summary["stall_s"] / summary["load_s"]
    print(
        f"{'question':>8} {'load ms':>9} {'stall ms':>9} {'hidden':>7} {'fg TTFT ms':>11} {'bg TTFT ms':>11}"
    )
    for i, run in enumerate(runs):
        cells = (run["load_s"] * 1e3, run["stall_s"] * 1e3, run["hidden"])
        ttfts = (run["ttft_foreground_s"] * 1e3, run["ttft_background_s"] * 1e3)
        print(
            f"{i:>8} {cells[0]:>9.1f} {cells[1]:>9.1f} {cells[2]:>7.0%} {ttfts[0]:>11.1f} {ttfts[1]:>11.1f}"
        )
    print(
        f"mean: load {summary['load_s'] * 1e3:.1f} ms, stall {summary['stall_s'] * 1e3:.1f} ms "
        f"({summary['hidden_of_mean']:.0%} hidden); TTFT {summary['ttft_foreground_s'] * 1e3:.1f} -> "
        f"{summary['ttft_background_s'] * 1e3:.1f} ms"
    )
    if args.out:
        write_json(args.out, {"settings": settings(args), "runs": runs, "summary": summary})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
