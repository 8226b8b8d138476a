"""Answer quality, fidelity to full prefill, and TTFT of each reuse method, side by side.

    python -m eval.quality --dataset ../shared/data/musique_dev.json --n 20 \
        --out runs/quality.json --plot runs/quality.png

Every question runs ``full`` (the reference) and then each other method; blend runs once per
(selector, recompute ratio). Chunk KV is precomputed before any timing, so TTFT measures reuse only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from blendrag.cli.common import add_device_args
from eval.metrics import best_rouge_l, kl_divergence
from harness.answers import best_em, best_f1, f1_score
from harness.data import ChunkSource, Item, dataset_chunks, load_dataset
from harness.report import settings
from harness.runner import Backend, Run, load_backend, run_questions
from harness.stats import summarize
from harness.variants import METHODS, REFERENCE, Variant, build_variants, float_list, name_list


def score_run(run: Run, golds: list[str], ref: Run) -> dict[str, Any]:
    n_tokens = run.stats.n_tokens
    return {
        "answer": run.answer,
        "ttft_s": run.stats.ttft_s,
        "n_tokens": n_tokens,
        "n_recomputed": run.stats.n_recomputed,
        "recomputed_frac": run.stats.n_recomputed / n_tokens if n_tokens else 0.0,
        "cache_hits": run.stats.cache_hits,
        "cache_misses": run.stats.cache_misses,
        "f1": best_f1(run.answer, golds),
        "em": best_em(run.answer, golds),
        "rouge_l": best_rouge_l(run.answer, golds),
        "same_as_full": float(run.answer == ref.answer),
        "f1_vs_full": f1_score(run.answer, ref.answer),
        "kl_vs_full": kl_divergence(ref.logits, run.logits),
    }


def question_record(item: Item, chunks: list[str], runs: dict[str, Run]) -> dict[str, Any]:
    ref = runs[REFERENCE]
    return {
        "question": item["question"],
        "gold": item["answers"],
        "n_chunks": len(chunks),
        "results": {name: score_run(run, item["answers"], ref) for name, run in runs.items()},
    }


def _mean(values: list[float]) -> float:
    return summarize(values)["mean"]


def summarize_variant(
    records: list[dict[str, Any]], variant: Variant, ref_ttft_mean: float
) -> dict[str, Any]:
    rows = [r["results"][variant.name] for r in records]
    # Per question, full and the variant ran back to back: the median of their ratios is robust
    # to a question that other work on the machine slowed down.
    ratios = [r["results"][REFERENCE]["ttft_s"] / row["ttft_s"] for r, row in zip(records, rows, strict=True)]

    def col(key: str) -> list[float]:
        return [row[key] for row in rows]

    ttft = summarize(col("ttft_s"))
    return {
        **dataclasses.asdict(variant),
        "n": len(rows),
        "f1": _mean(col("f1")),
        "em": _mean(col("em")),
        "rouge_l": _mean(col("rouge_l")),
        "agree_full": _mean(col("same_as_full")),
        "kl_full": _mean(col("kl_vs_full")),
        "f1_full": _mean(col("f1_vs_full")),
        "ttft_mean_s": ttft["mean"],
        "ttft_p50_s": ttft["p50"],
        "ttft_p90_s": ttft["p90"],
        "speedup": ref_ttft_mean / ttft["mean"] if ttft["mean"] > 0 else math.nan,
        "speedup_p50": summarize(ratios)["p50"],
        "recomputed_frac": _mean(col("recomputed_frac")),
    }


def summarize_all(records: list[dict[str, Any]], variants: list[Variant]) -> list[dict[str, Any]]:
    ref_ttft_mean = _mean([r["results"][REFERENCE]["ttft_s"] for r in records])
    return [summarize_variant(records, v, ref_ttft_mean) for v in variants]


# (header, summary key, format) of each printed column
_COLUMNS = [
    ("variant", "name", "{}"),
    ("n", "n", "{}"),
    ("F1", "f1", "{:.3f}"),
    ("EM", "em", "{:.3f}"),
    ("RougeL", "rouge_l", "{:.3f}"),
    ("agree", "agree_full", "{:.3f}"),
    ("KL", "kl_full", "{:.4f}"),
    ("F1@full", "f1_full", "{:.3f}"),
    ("TTFT ms", "ttft_mean_s", "ms"),
    ("p50 ms", "ttft_p50_s", "ms"),
    ("p90 ms", "ttft_p90_s", "ms"),
    ("speedup", "speedup", "{:.2f}x"),
    ("p50 speedup", "speedup_p50", "{:.2f}x"),
    ("recomp", "recomputed_frac", "{:.1%}"),
]


def _cell(value: Any, fmt: str) -> str:
    return f"{value * 1e3:.1f}" if fmt == "ms" else fmt.format(value)


def format_table(summary: list[dict[str, Any]]) -> str:
    """Columns padded to their widest cell: names left-aligned, numbers right-aligned."""
    grid = [[h for h, _, _ in _COLUMNS]] + [[_cell(row[k], f) for _, k, f in _COLUMNS] for row in summary]
    widths = [max(len(r[i]) for r in grid) for i in range(len(_COLUMNS))]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return "\n".join(line(cells) for cells in grid)


def _new_figure(n_axes: int) -> tuple[Figure, list[Any]]:
    # Figure + Agg canvas, not pyplot: no global backend state, safe inside a server or test process.
    fig = Figure(figsize=(6.5 * n_axes, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, [fig.add_subplot(1, n_axes, i + 1) for i in range(n_axes)]


def plot_quality_vs_ttft(summary: list[dict[str, Any]], path: Path) -> None:
    """F1 against mean TTFT, one labelled point per variant (the CacheBlend paper's trade-off plot)."""
    fig, (ax,) = _new_figure(1)
    # One colour per method (per selector for blend); blend points are labelled with their ratio.
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in summary:
        groups.setdefault(row["name"].split("@")[0], []).append(row)
    for group, rows in groups.items():
        xs, ys = [r["ttft_mean_s"] * 1e3 for r in rows], [r["f1"] for r in rows]
        ax.scatter(xs, ys, marker="*" if group == REFERENCE else "o", s=80, label=group)
        for row, x, y in zip(rows, xs, ys, strict=True):
            label = f"{row['ratio']:g}" if row["mode"] == "blend" else row["name"]
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set(xlabel="mean TTFT (ms)", ylabel="F1 vs gold", title="Quality vs time to first token")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)


# Horizontal reference lines on the fidelity plot: the exact method and the no-recompute one.
_REFERENCE_STYLES = {REFERENCE: "--", "reuse": ":"}


def plot_fidelity(summary: list[dict[str, Any]], path: Path) -> None:
    """Agreement with full and F1 against full's answer, per selector, over the recompute ratio."""
    fig, axes = _new_figure(2)
    blend = [row for row in summary if row["mode"] == "blend"]
    for ax, key, label in zip(
        axes, ("agree_full", "f1_full"), ("answer identical to full", "F1 vs full"), strict=True
    ):
        for selector in dict.fromkeys(row["selector"] for row in blend):
            points = sorted((row["ratio"], row[key]) for row in blend if row["selector"] == selector)
            ax.plot(*zip(*points, strict=True), marker="o", label=f"blend/{selector}")
        for ref in (row for row in summary if row["mode"] in _REFERENCE_STYLES):
            ax.axhline(ref[key], linestyle=_REFERENCE_STYLES[ref["mode"]], color="gray", label=ref["name"])
        ax.set(xlabel="recompute ratio", ylabel=label, ylim=(-0.02, 1.02))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)


def fidelity_path(plot_path: Path) -> Path:
    return plot_path.with_name(f"{plot_path.stem}_fidelity.png")


def _json_safe(value: Any) -> Any:
    # NaN/inf (a broken engine's logits, an empty run) are not valid JSON: write them as null.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m eval.quality", description=__doc__.splitlines()[0])
    p.add_argument("--dataset", type=Path, required=True, help="JSON list of {question, answers, ctxs}")
    p.add_argument("--n", type=int, default=None, help="first N questions (default: all)")
    p.add_argument("--top-k", type=int, default=6, help="chunks per question")
    p.add_argument("--methods", type=name_list, default=list(METHODS), help="comma-separated")
    p.add_argument("--ratios", type=float_list, default=[0.05, 0.1, 0.15, 0.3], help="blend recompute ratios")
    p.add_argument(
        "--configs",
        type=lambda t: [x.strip() for x in t.split(";") if x.strip()],
        default=["preview"],
        help='blend configs, ";"-separated; each a selector and BlendConfig overrides, '
        'e.g. "preview;deviation,check_layer=1,first_k=4" (overrides apply to the default config)',
    )
    p.add_argument(
        "--retrieve",
        action="store_true",
        help="end to end: index every passage of the dataset with the project's indexer, then "
        "retrieve each question's top-k chunks from it (default: the dataset's first k passages)",
    )
    p.add_argument(
        "--index-dir", type=Path, default=None, help="with --retrieve (default: runs/<dataset>-index)"
    )
    p.add_argument("--kv-store", default=None, help="KV store spec (default: the engine's default)")
    p.add_argument("--chunk-context", default="none", choices=["none", "prefix"])
    p.add_argument("--model", default=None, help="local checkpoint dir (default: the engine's default model)")
    add_device_args(p)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument(
        "--out", type=Path, default=None, help="write records and summary as JSON (after every question)"
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep the records already in --out (same settings) and run the remaining questions",
    )
    p.add_argument("--plot", type=Path, default=None, help="F1-vs-TTFT PNG; also writes <stem>_fidelity.png")
    return p.parse_args(argv)


# Settings that may differ between an interrupted run and its resumption.
_RESUMABLE = {"n", "out", "plot", "resume"}


def write_report(
    args: argparse.Namespace, variants: list[Variant], records: list[dict[str, Any]], complete: bool
) -> None:
    """The JSON report, replaced atomically: a run killed mid-write leaves the previous one."""
    report = {
        "settings": settings(args),
        "complete": complete,
        "summary": summarize_all(records, variants),
        "records": records,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(_json_safe(report), indent=1, allow_nan=False))
    tmp.replace(args.out)


def resumed_records(args: argparse.Namespace, items: list[Item]) -> list[dict[str, Any]]:
    """The records of an earlier run into ``--out`` when ``--resume`` is given and it matches."""
    if not (args.resume and args.out and args.out.exists()):
        return []
    report = json.loads(args.out.read_text())
    mine, theirs = settings(args), report.get("settings", {})
    differing = sorted(k for k in mine.keys() - _RESUMABLE if theirs.get(k) != mine[k])
    if differing:
        raise ValueError(f"--resume: {args.out} was run with other settings ({', '.join(differing)})")
    records = report.get("records", [])[: len(items)]
    if [r["question"] for r in records] != [it["question"] for it in items[: len(records)]]:
        raise ValueError(f"--resume: {args.out} holds other questions than the dataset's first ones")
    return records


def write_plots(args: argparse.Namespace, summary: list[dict[str, Any]]) -> None:
    if args.plot:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        plot_quality_vs_ttft(summary, args.plot)
        plot_fidelity(summary, fidelity_path(args.plot))


def chunk_source(args: argparse.Namespace, backend: Backend, items: list[Item]) -> ChunkSource:
    if not args.retrieve:
        return dataset_chunks(args.top_k)
    from eval.retrieve import retrieved_chunks  # the retriever's imports are heavy

    index_dir = args.index_dir or Path("runs") / f"{args.dataset.stem}-index"
    return retrieved_chunks(backend.engine, items, index_dir, args.top_k)


def main(argv: Sequence[str] | None = None, backend_factory: Callable[..., Backend] = load_backend) -> int:
    args = parse_args(argv)
    try:
        variants = build_variants(args.methods, args.ratios, args.configs)
        items = load_dataset(args.dataset, args.n)
        done = resumed_records(args, items)
    except (ValueError, OSError) as err:
        raise SystemExit(f"error: {err}") from None
    backend = backend_factory(args.model, args.kv_store, args.chunk_context, args.device, args.dtype)
    try:
        # A bad ratio or selector should fail now, not after minutes of precompute.
        for variant in variants:
            backend.config_for(variant)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    checkpoint = (lambda records: write_report(args, variants, records, complete=False)) if args.out else None
    source = chunk_source(args, backend, items)
    records = run_questions(
        backend, items, variants, source, args.max_new_tokens, question_record, done, checkpoint
    )
    summary = summarize_all(records, variants)
    print(format_table(summary))
    if args.out:
        write_report(args, variants, records, complete=True)
    write_plots(args, summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
