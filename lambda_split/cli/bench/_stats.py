"""Summaries of repeated measurements: median and spread, never a single sample."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile, ``q`` in [0, 1]."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summarize(values: Sequence[float], digits: int = 4) -> dict[str, Any]:
    """``{median, q1, q3, min, max, n}`` of ``values`` (q1/q3 are the interquartile range)."""
    if not values:
        return {"median": None, "q1": None, "q3": None, "min": None, "max": None, "n": 0}
    return {
        "median": round(statistics.median(values), digits),
        "q1": round(quantile(values, 0.25), digits),
        "q3": round(quantile(values, 0.75), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
        "n": len(values),
    }


#: Largest coefficient of variation (standard deviation over mean) of any variant's speed across
#: repetitions for a run to count as steady. Paired ratios cancel a slow drift of the machine, not a
#: busy neighbour that comes and goes within a repetition; pyperf warns from 10 %, and a 0.95× goal
#: needs tighter.
STEADY_CV = 0.05


def variation(values: Sequence[float]) -> float | None:
    """Coefficient of variation (standard deviation over mean) of ``values``; None under 2 samples."""
    if len(values) < 2 or not statistics.fmean(values) > 0:
        return None
    return statistics.stdev(values) / statistics.fmean(values)


def steadiness(speeds: Mapping[str, Sequence[float]]) -> dict[str, Any]:
    """How steady repeated speeds of several things were: ``cv`` and ``variant`` of the most variable,
    ``steady`` (its cv within :data:`STEADY_CV`) and every cv ``by_variant``; None for what has under 2 samples."""
    by_variant = {name: variation(values) for name, values in speeds.items()}
    measured = {name: cv for name, cv in by_variant.items() if cv is not None}
    if not measured:
        return {"cv": None, "variant": None, "steady": None, "by_variant": by_variant}
    worst = max(measured, key=lambda name: measured[name])
    return {"cv": round(measured[worst], 4), "variant": worst, "steady": measured[worst] <= STEADY_CV,
            "by_variant": {name: None if cv is None else round(cv, 4) for name, cv in by_variant.items()}}  # fmt: skip


def ratios(numerators: Sequence[float], denominators: Sequence[float]) -> list[float]:
    """Paired ratios: sample i of the numerator over sample i of the denominator (same repetition)."""
    return [a / b for a, b in zip(numerators, denominators, strict=True) if b > 0]


def rotated(items: Sequence[str], rep: int) -> list[str]:
    """``items`` rotated by ``rep``, so across repetitions every item runs in every position."""
    shift = rep % len(items) if items else 0
    return list(items[shift:]) + list(items[:shift])


def fmt(summary: dict[str, Any] | None, unit: str = "", digits: int = 2) -> str:
    """``median [q1–q3]`` for tables."""
    if not summary or summary.get("median") is None:
        return "–"
    med, q1, q3 = summary["median"], summary["q1"], summary["q3"]
    return f"{med:.{digits}f}{unit} [{q1:.{digits}f}–{q3:.{digits}f}]"
