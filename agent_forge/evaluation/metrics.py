"""Accuracy intervals: Wilson for a proportion, a seeded percentile bootstrap for anything.

Wilson rather than the normal approximation because our sets are small (30-300 items)
and accuracies near 0 or 1 are common; the normal interval there leaves [0, 1].
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np


def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """95% (by default) Wilson score interval for successes/n; (0, 1) when n == 0."""
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def bootstrap_ci(values: Sequence[float], stat: Callable[[np.ndarray], float] = np.mean,
                 n_boot: int = 2000, alpha: float = 0.05, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of stat(values), resampling with a fixed seed."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(n_boot, x.size))
    stats = np.array([stat(x[row]) for row in idx])
    return (float(np.quantile(stats, alpha / 2)), float(np.quantile(stats, 1 - alpha / 2)))


def accuracy_summary(correct: Sequence[bool]) -> dict:
    """{accuracy, n, ci95: [lo, hi]} for a list of per-example correctness flags."""
    n, k = len(correct), int(sum(bool(c) for c in correct))
    lo, hi = wilson_interval(k, n)
    return {"accuracy": k / n if n else 0.0, "n": n, "ci95": [lo, hi]}
