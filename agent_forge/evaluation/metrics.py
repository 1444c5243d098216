"""Accuracy intervals: Wilson for a proportion, a seeded percentile bootstrap for anything,
Student's t for a mean over units (a loss per validation block, a paired loss difference).

Wilson rather than the normal approximation because our sets are small (30-300 items)
and accuracies near 0 or 1 are common; the normal interval there leaves [0, 1]. Both are
thin wrappers over scipy, so the arithmetic is scipy's, not ours.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from scipy import stats


def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """95% (by default) Wilson score interval for successes/n; (0, 1) when n == 0."""
    if n <= 0:
        return (0.0, 1.0)
    level = 2 * stats.norm.cdf(z) - 1
    ci = stats.binomtest(int(successes), int(n)).proportion_ci(confidence_level=level, method="wilson")
    return (float(ci.low), float(ci.high))


def bootstrap_ci(values: Sequence[float], stat: Callable[..., float] = np.mean,
                 n_boot: int = 2000, alpha: float = 0.05, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of stat(values), resampling with a fixed seed.

    Empty input has no interval (NaN); a single value resamples only to itself.
    """
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return (float("nan"), float("nan"))
    if x.size == 1:
        return (float(stat(x)),) * 2
    res = stats.bootstrap((x,), stat, n_resamples=n_boot, confidence_level=1 - alpha,
                          method="percentile", rng=np.random.default_rng(seed))
    return (float(res.confidence_interval.low), float(res.confidence_interval.high))


def accuracy_summary(correct: Sequence[bool]) -> dict:
    """{accuracy, n, ci95: [lo, hi]} for a list of per-example correctness flags."""
    n, k = len(correct), int(sum(bool(c) for c in correct))
    lo, hi = wilson_interval(k, n)
    return {"accuracy": k / n if n else 0.0, "n": n, "ci95": [lo, hi]}


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> dict:
    """{mean, ci95: [lo, hi], n}: Student's t interval of the mean of `values`, each one unit
    (a validation block's mean token loss: a block's tokens are not independent, the blocks
    nearly are). Fewer than two values have no interval (ci95 None)."""
    x = np.asarray(values, dtype=float)
    mean = float(x.mean()) if x.size else float("nan")
    if x.size < 2:
        return {"mean": mean, "ci95": None, "n": int(x.size)}
    if np.all(x == x[0]):  # no spread: the interval is the point (scipy's would be NaN)
        return {"mean": mean, "ci95": [mean, mean], "n": int(x.size)}
    ci = stats.ttest_1samp(x, 0.0).confidence_interval(confidence_level=confidence)
    return {"mean": mean, "ci95": [float(ci.low), float(ci.high)], "n": int(x.size)}


def paired_difference(a: Sequence[float], b: Sequence[float]) -> dict:
    """mean_interval of a - b unit by unit (the same validation blocks scored by two models):
    the pairing removes what the blocks share, so a small but steady difference shows."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired_difference: {a.shape} and {b.shape} values do not pair")
    return mean_interval(a - b)


def clearly_below(diff: dict) -> bool:
    """The whole 95% interval of a difference is below 0 (no interval: not shown)."""
    return bool(diff.get("ci95")) and diff["ci95"][1] < 0


def clearly_above(diff: dict) -> bool:
    return bool(diff.get("ci95")) and diff["ci95"][0] > 0


def difference_verdict(diff: dict, lower: str, higher: str, tie: str) -> str:
    """`lower` when the whole interval of diff is below 0, `higher` when above, else `tie`."""
    return lower if clearly_below(diff) else higher if clearly_above(diff) else tie
