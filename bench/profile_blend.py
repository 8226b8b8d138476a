"""Where a blended prefill spends its time: phases (store reads, RoPE re-alignment, preview, the
layers that run on every token up to the check layer, the other layers, which run on the selected
tokens only, selection) and,
inside them, attention against the rest (projections and MLP), from the torch profiler.

    python -m bench.profile_blend [--dataset ../shared/data/musique_dev.json] [--n 3] \\
        [--ratio 0.15] [--out runs/profile.json]

It also states how close blend gets to its ideal speedup 1/(r(1-f) + f + q): f is the share of
the layers that run on every token, q the question's share of the prompt.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

from torch.profiler import ProfilerActivity, profile

from blendrag import BlendConfig, BlendEngine
from harness.data import DEFAULT_DATASET, load_prompts
from harness.report import write_json

PHASES = (
    "blendrag.store_read",
    "blendrag.realign",
    "blendrag.preview",
    "blendrag.layers_all_tokens",
    "blendrag.layers",
    "blendrag.select",
)
ATTENTION_OPS = ("scaled_dot_product", "flash_attention", "_efficient_attention")


def self_ms_by(events, match) -> float:
    return sum(e.self_cpu_time_total for e in events if match(e.key)) / 1e3


def _inside(event, name: str) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name == name:
            return True
        parent = parent.cpu_parent
    return False


def phase_ms(events) -> dict[str, float]:
    """Time under each phase label; the preview's own layer loop counts as preview only."""
    phases = dict.fromkeys(PHASES, 0.0)
    for e in events:
        if e.name in phases and (e.name == "blendrag.preview" or not _inside(e, "blendrag.preview")):
            phases[e.name] += e.cpu_time_total / 1e3
    return phases


def profile_prefill(engine: BlendEngine, chunks: list[str], question: str, config: BlendConfig) -> dict:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        pre = engine.prefill(chunks, question, mode="blend", config=config)
    phases = phase_ms(prof.events())
    events = prof.key_averages()
    attention = self_ms_by(events, lambda k: any(op in k for op in ATTENTION_OPS))
    total_self = self_ms_by(events, lambda k: not k.startswith("blendrag."))
    stats = pre.stats.to_dict()  # written into the JSON report
    return {"phases_ms": phases, "attention_ms": attention, "ops_ms": total_self, "stats": stats}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.profile_blend", description=__doc__.splitlines()[0])
    p.add_argument("--dataset", type=Path, default=DEFAULT_DATASET)
    p.add_argument("--n", type=int, default=3)
    p.add_argument("--top-k", type=int, default=6)
    p.add_argument("--ratio", type=float, default=None, help="default: the engine's default config's")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    # Foreground loading: a background load's store reads and realignment would run on a thread
    # the profiler's phase labels do not see (bench.prefetch measures that overlap).
    engine = BlendEngine.from_pretrained(store="memory", prefetch=False)
    config = BlendConfig() if args.ratio is None else BlendConfig(recompute_ratio=args.ratio)
    runs = []
    for chunks, question in load_prompts(args.dataset, args.n, args.top_k):
        engine.precompute(chunks)
        engine.prefill(chunks, question, mode="blend", config=config)  # warm-up
        full_ttft = engine.prefill(chunks, question, mode="full").stats.ttft_s
        run = profile_prefill(engine, chunks, question, config)
        run["full_ttft_s"] = full_ttft
        run["blend_ttft_s"] = engine.prefill(chunks, question, mode="blend", config=config).stats.ttft_s
        runs.append(run)
    report = summarize(runs, config, engine.model.args.n_layers)
    print_report(report)
    if args.out:
        write_json(args.out, {"config": config.__dict__, "runs": runs, "summary": report})


def summarize(runs: list[dict], config: BlendConfig, n_layers: int) -> dict:
    phases: dict[str, float] = defaultdict(float)
    for run in runs:
        for name, ms in run["phases_ms"].items():
            phases[name] += ms / len(runs)
    n_tokens = sum(r["stats"]["n_tokens"] for r in runs) / len(runs)
    n_question = sum(r["stats"]["n_recomputed"] for r in runs) / len(runs) - config.recompute_ratio * n_tokens
    f = config.check_layer / n_layers
    q = max(n_question, 0) / n_tokens
    ideal = 1 / (config.recompute_ratio * (1 - f) + f + q)
    full = sum(r["full_ttft_s"] for r in runs) / len(runs)
    blend = sum(r["blend_ttft_s"] for r in runs) / len(runs)
    return {
        "phases_ms": dict(phases),
        "attention_share_of_ops": sum(r["attention_ms"] for r in runs) / sum(r["ops_ms"] for r in runs),
        "full_ttft_s": full,
        "blend_ttft_s": blend,
        "speedup": full / blend,
        "ideal_speedup": ideal,
        "share_of_ideal": (full / blend) / ideal,
    }


def print_report(report: dict) -> None:
    total = sum(v for k, v in report["phases_ms"].items() if k != "blendrag.select")
    print(f"{'phase':<30} {'ms':>9} {'share':>7}")
    for name, ms in report["phases_ms"].items():
        print(f"{name:<30} {ms:>9.1f} {ms / total:>7.1%}")
    print(f"attention's share of op time: {report['attention_share_of_ops']:.1%}")
    print(
        f"full {report['full_ttft_s']:.2f} s, blend {report['blend_ttft_s']:.2f} s: "
        f"{report['speedup']:.2f}x of an ideal {report['ideal_speedup']:.2f}x "
        f"({report['share_of_ideal']:.0%})"
    )


if __name__ == "__main__":
    main()
