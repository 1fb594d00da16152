"""Percentiles, medians, ratios and a least-squares fit over benchmark samples."""

from __future__ import annotations

import statistics
from collections.abc import Sequence


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100, linear interpolation) of already sorted values."""
    if not sorted_values:
        raise ValueError("no samples")
    if len(sorted_values) == 1:
        return float(sorted_values[0])
    rank = (len(sorted_values) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(sorted_values) - 1)
    return float(sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (rank - low))


def scaled_percentiles(sorted_ns: Sequence[int], unit_ns: float, qs: dict[str, float]) -> dict[str, float]:
    """{name: the q-th percentile} for each name: q in `qs`, of sorted nanosecond samples, in units of
    `unit_ns` nanoseconds rounded to 3 places."""
    return {name: round(percentile(sorted_ns, q) / unit_ns, 3) for name, q in qs.items()}


def percentiles_ms(samples_ns: Sequence[int]) -> dict[str, float | int | None]:
    """n, p50, p90, p99, p99.9 and max of nanosecond samples, in milliseconds (None without samples)."""
    if not samples_ns:
        return {"n": 0, "p50": None, "p90": None, "p99": None, "p99.9": None, "max": None}
    ordered = sorted(samples_ns)
    return {
        "n": len(ordered),
        **scaled_percentiles(ordered, 1e6, {"p50": 50, "p90": 90, "p99": 99, "p99.9": 99.9}),
        "max": round(ordered[-1] / 1e6, 3),
    }


def median_or_none(values: Sequence[float | int | None]) -> float | None:
    """The median of the values that are not None (None if there are none)."""
    present = [float(v) for v in values if v is not None]
    return round(statistics.median(present), 3) if present else None


def ratio(numerator: float | None, denominator: float | None, digits: int = 3) -> float | None:
    """numerator / denominator, or None when either is missing or the denominator is not positive."""
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return round(numerator / denominator, digits)


def linear_fit(xs: Sequence[float], ys: Sequence[float]) -> dict[str, float]:
    """Least-squares line y = slope * x + intercept, with R²."""
    if len(xs) != len(ys) or len(set(xs)) < 2:
        raise ValueError("a fit needs at least two distinct x values")
    mean_x = statistics.fmean(xs)
    mean_y = statistics.fmean(ys)
    sxx = sum((x - mean_x) ** 2 for x in xs)
    sxy = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True))
    slope = sxy / sxx
    intercept = mean_y - slope * mean_x
    ss_tot = sum((y - mean_y) ** 2 for y in ys)
    ss_res = sum((y - (slope * x + intercept)) ** 2 for x, y in zip(xs, ys, strict=True))
    return {"slope": slope, "intercept": intercept, "r2": 1 - ss_res / ss_tot if ss_tot > 0 else 1.0}


def summary_us(samples_ns: Sequence[int]) -> dict[str, float]:
    """n, median, p90, p99 and mean of nanosecond samples, in microseconds (for sub-millisecond timings)."""
    ordered = sorted(samples_ns)
    return {
        "n": len(ordered),
        **scaled_percentiles(ordered, 1000, {"median_us": 50, "p90_us": 90, "p99_us": 99}),
        "mean_us": round(statistics.fmean(ordered) / 1000, 3),
    }
