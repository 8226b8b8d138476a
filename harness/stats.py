"""Summaries of a column of measurements."""

from __future__ import annotations

import random
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


def bootstrap_ci(values: Sequence[float], level: float = 0.95, resamples: int = 2000, seed: int = 0) -> tuple:
    """Percentile bootstrap interval of the mean of ``values`` (a fixed seed: the same data gives
    the same interval); (nan, nan) for an empty input."""
    if not values:
        return float("nan"), float("nan")
    rng, n = random.Random(seed), len(values)
    means = sorted(sum(rng.choices(values, k=n)) / n for _ in range(resamples))
    tail = (1 - level) / 2
    return _percentile(means, tail), _percentile(means, 1 - tail)
