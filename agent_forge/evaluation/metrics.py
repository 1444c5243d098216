"""Accuracy intervals: Wilson for a proportion, a seeded percentile bootstrap for anything.

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
