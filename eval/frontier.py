"""The speed-fidelity frontier of a fidelity screen: TTFT speedup over full prefill against
first-token KL, one line per blend configuration across its recompute ratios.

    python -m eval.frontier runs/fid-frontier.json --floors runs/fid-floors.json --out frontier.png

The report (``eval.fidelity --out``) must hold a ``full`` variant: a variant's speedup is the
median over questions of full's TTFT divided by its own, from the same run. ``--beside
LABEL=REPORT`` (repeatable) draws another run's configurations too (another ``--chunk-context``,
say), as ``LABEL:SPEC``, each timed against that run's own ``full``. Noise-floor rows
(``eval.fidelity --floors``, of this report or of ``--floors`` reports) are drawn as horizontal
lines at their mean KL.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from eval.merge import beside_spec
from eval.noise_floor import FLOORS


def points(records: list[dict[str, Any]], label: str = "") -> dict[str, tuple[float, float]]:
    """Each variant but full: (median per-question TTFT speedup over full, mean first-token KL),
    named ``LABEL:NAME`` when a label is given."""
    names = [n for n in records[0]["results"] if n != "full" and n not in FLOORS]
    out = {}
    for name in names:
        ratios = [r["results"]["full"]["ttft_s"] / r["results"][name]["ttft_s"] for r in records]
        kl = statistics.fmean(r["results"][name]["kl_first"] for r in records)
        out[f"{label}:{name}" if label else name] = (statistics.median(ratios), kl)
    return out


def load_report(path: Path) -> dict[str, Any]:
    """An eval.fidelity report with a full variant to time the others against."""
    report = json.loads(path.read_text())
    if not report["records"] or "full" not in report["records"][0]["results"]:
        raise ValueError(f"{path}: no full variant to time the others against")
    return report


def floor_levels(reports: list[dict[str, Any]]) -> dict[str, float]:
    """Mean KL of every noise-floor row in ``reports`` (the first report holding it wins)."""
    levels: dict[str, float] = {}
    for report in reports:
        for row in report["summary"]:
            if row["name"] in FLOORS:
                levels.setdefault(row["name"], row["kl_first"])
    return levels


def plot(
    frontier: dict[str, tuple[float, float]],
    floors: dict[str, float],
    title: str,
    path: Path,
    labels: dict[str, str],
) -> None:
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    lines: dict[str, list[tuple[float, float, str]]] = {}
    for name, (speedup, kl) in frontier.items():
        spec, at, ratio = name.rpartition("@")
        lines.setdefault(spec if at else name, []).append((speedup, kl, ratio if at else ""))
    for spec, pts in lines.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=labels.get(spec, spec))
        for speedup, kl, ratio in pts:
            if ratio:
                ax.annotate(
                    f"r={ratio}", (speedup, kl), textcoords="offset points", xytext=(4, 4), fontsize=7
                )
    for name, kl in floors.items():
        ax.axhline(kl, linestyle="--", color="gray", linewidth=1)
        # x in axes coordinates (the right edge), y at the floor's KL
        ax.text(
            0.99, kl, f"full, {name}", transform=ax.get_yaxis_transform(), ha="right", va="bottom", fontsize=7
        )
    ax.set(xlabel="TTFT speedup over full prefill (median per question)", ylabel="first-token KL to full")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval.frontier", description=__doc__.splitlines()[0])
    p.add_argument("report", type=Path, help="an eval.fidelity --out report with a full variant")
    p.add_argument(
        "--beside",
        action="append",
        default=[],
        help="LABEL=REPORT: another run with its own full variant, drawn as LABEL:SPEC",
    )
    p.add_argument("--floors", type=Path, nargs="*", default=[], help="reports with noise-floor rows")
    p.add_argument("--show-floors", default="", help="comma-separated floor names to draw (default: all)")
    p.add_argument("--title", default="")
    p.add_argument(
        "--label",
        action="append",
        default=[],
        help="SPEC=TEXT: the legend's name for a config (TEXT without =)",
    )
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    try:
        report = load_report(args.report)
        frontier = points(report["records"])
        for spec in args.beside:
            label, path = beside_spec(spec, "REPORT")
            frontier |= points(load_report(path)["records"], label)
        extra = [json.loads(path.read_text()) for path in args.floors]
    except (OSError, ValueError, KeyError) as err:
        raise SystemExit(f"error: {err}") from None
    labels = dict(label.rpartition("=")[::2] for label in args.label)
    floors = floor_levels([report, *extra])
    if args.show_floors:
        floors = {name: kl for name, kl in floors.items() if name in args.show_floors.split(",")}
    plot(frontier, floors, args.title, args.out, labels)
    for name, (speedup, kl) in frontier.items():
        print(f"{name:<40} {speedup:5.2f}x  KL {kl:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
