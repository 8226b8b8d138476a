"""One report from ``eval.fidelity`` reports over consecutive slices of a data set (runs split by
``--skip``/``--n``, on one machine or several), with paired differences between variants.

    python -m eval.merge runs/part-0.json runs/part-20.json ... --out runs/all.json \\
        --pair "preview,offset_weight=0.5+adapter@0.15;preview,offset_weight=0.5@0.15"

The parts must have been run with the same settings but ``--skip``, ``--n`` and ``--out``, and
must not overlap. A pair ``A;B`` (two variant names) reports, per metric, the mean over questions
of A minus B with its bootstrap 95 % interval, and on how many questions A's first-token KL is the
lower.

``--beside LABEL=PART`` (repeatable) adds another run over the same questions, with other settings
(another ``--chunk-context``, say): its parts are merged the same way and its variants join each
question's results as ``LABEL:NAME``, so pairs can compare across the two runs.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from eval.fidelity import METRICS, print_summary, summarize_all
from harness.report import write_json
from harness.stats import bootstrap_ci, summarize

SLICE_KEYS = ("skip", "n", "out")  # the settings that differ between the parts of one run


def merge(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """The parts' records in data-set order, re-summarized; refuses parts of different runs or
    overlapping parts."""
    base = {k: v for k, v in reports[0]["settings"].items() if k not in SLICE_KEYS}
    for report in reports[1:]:
        other = {k: v for k, v in report["settings"].items() if k not in SLICE_KEYS}
        if other != base:
            differ = sorted(k for k in base.keys() | other.keys() if base.get(k) != other.get(k))
            raise ValueError(f"the parts were run with different settings: {', '.join(differ)}")
    reports = sorted(reports, key=lambda r: r["settings"]["skip"])
    for a, b in zip(reports, reports[1:], strict=False):
        if a["settings"]["skip"] + len(a["records"]) > b["settings"]["skip"]:
            raise ValueError(
                f"parts starting at questions {a['settings']['skip']} and {b['settings']['skip']} overlap"
            )
    records = [r for report in reports for r in report["records"]]
    names = [row["name"] for row in reports[0]["summary"]]
    settings = base | {"skip": reports[0]["settings"]["skip"], "n": len(records)}
    return {"settings": settings, "summary": summarize_all(records, names), "records": records}


def beside(merged: dict[str, Any], label: str, other: dict[str, Any]) -> dict[str, Any]:
    """``merged`` with ``other``'s variants (a run over the same questions, with other settings)
    added to each question's results as ``LABEL:NAME``."""
    if [r["question"] for r in other["records"]] != [r["question"] for r in merged["records"]]:
        raise ValueError(f"--beside {label}: its parts hold other questions than the main run's")
    records = [
        r | {"results": r["results"] | {f"{label}:{name}": v for name, v in o["results"].items()}}
        for r, o in zip(merged["records"], other["records"], strict=True)
    ]
    names = [row["name"] for row in merged["summary"]]
    names += [f"{label}:{row['name']}" for row in other["summary"]]
    settings = merged["settings"] | {f"beside:{label}": other["settings"]}
    return {"settings": settings, "summary": summarize_all(records, names), "records": records}


def paired(records: list[dict[str, Any]], a: str, b: str) -> dict[str, Any]:
    """Per metric that both carry: the mean of ``a`` minus ``b`` over questions and its bootstrap
    95 % interval; ``kl_lower``: questions on which ``a``'s first-token KL is the lower."""
    out: dict[str, Any] = {"a": a, "b": b, "n": len(records)}
    for key in METRICS:
        diffs = [
            r["results"][a][key] - r["results"][b][key]
            for r in records
            if key in r["results"][a] and key in r["results"][b]
        ]
        if diffs:
            out[key] = summarize(diffs)["mean"]
            out[f"{key}_ci"] = list(bootstrap_ci(diffs))
    out["kl_lower"] = sum(r["results"][a]["kl_first"] < r["results"][b]["kl_first"] for r in records)
    return out


def format_pair(diff: dict[str, Any]) -> str:
    parts = [f"{diff['a']} - {diff['b']} ({diff['n']} questions, KL lower on {diff['kl_lower']}):"]
    for key in METRICS:
        if key in diff:
            lo, hi = diff[f"{key}_ci"]
            parts.append(f"  {key} {diff[key]:+.4f} [{lo:+.4f}, {hi:+.4f}]")
    return "\n".join(parts)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m eval.merge", description=__doc__.split("\n\n")[0])
    p.add_argument("parts", type=Path, nargs="+", help="eval.fidelity --out reports")
    p.add_argument("--out", type=Path, help="the merged report (JSON), with the pairs under 'paired'")
    p.add_argument("--pair", action="append", default=[], help="A;B: paired differences A minus B")
    p.add_argument(
        "--beside",
        action="append",
        default=[],
        metavar="LABEL=PART",
        help="a part of another run over the same questions; its variants are named LABEL:NAME",
    )
    return p.parse_args(argv)


def beside_spec(spec: str, what: str = "PART") -> tuple[str, Path]:
    """``LABEL=PATH``, the value of a ``--beside`` flag (here and in ``eval.frontier``)."""
    label, sep, path = spec.partition("=")
    if not (label and sep and path):
        raise ValueError(f"--beside {spec}: expected LABEL={what}")
    return label, Path(path)


def merge_files(paths: Sequence[Path]) -> dict[str, Any]:
    return merge([json.loads(path.read_text()) for path in paths])


def merged_with_beside(args: argparse.Namespace) -> dict[str, Any]:
    """The main run's parts merged, with each ``--beside`` run's merged parts beside them."""
    merged = merge_files(args.parts)
    others: dict[str, list[Path]] = {}
    for spec in args.beside:
        label, path = beside_spec(spec)
        others.setdefault(label, []).append(path)
    for label, paths in others.items():
        merged = beside(merged, label, merge_files(paths))
    return merged


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        merged = merged_with_beside(args)
        pairs = [tuple(spec.split(";")) for spec in args.pair]
        names = {row["name"] for row in merged["summary"]}
        for pair in pairs:
            if len(pair) != 2 or not set(pair) <= names:
                raise ValueError(f"--pair {';'.join(pair)}: expected A;B of {', '.join(sorted(names))}")
    except (ValueError, OSError, KeyError) as err:
        raise SystemExit(f"error: {err}") from None
    merged["paired"] = [paired(merged["records"], a, b) for a, b in pairs]
    print_summary(merged["summary"], merged["records"])
    for diff in merged["paired"]:
        print(format_pair(diff))
    if args.out:
        write_json(args.out, merged)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
