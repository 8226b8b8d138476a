"""Summaries of a column of measurements."""

from __future__ import annotations

from collections.abc import Sequence


def _percentile(ordered: Sequence[float], q: float) -> float:
    # Linear interpolation between closest ranks (numpy's default), without pulling in numpy.
    pos = (len(ordered) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize(values: Sequence[float], percentiles: Sequence[int] = (50, 90)) -> dict[str, float]:
    """Mean and the given percentiles (keys ``p50``, ``p90``, ...); NaN for an empty input so a
    missing metric stays visible."""
    if not values:
        return dict.fromkeys(["mean", *(f"p{p}" for p in percentiles)], float("nan"))
    ordered = sorted(values)
    summary = {"mean": sum(ordered) / len(ordered)}
    summary |= {f"p{p}": _percentile(ordered, p / 100) for p in percentiles}
    return summary
