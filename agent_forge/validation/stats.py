"""The significance tests the validation steps rely on, in one place.

Paired designs throughout: the same items (or rounds) are answered by both arms, so we
test differences, not two independent samples. The sign test is exact (a binomial test on
the pairs that differ) because our sets are small; on right/wrong pairs it is the exact
McNemar test. A p-value with no discordant pairs is 1 with `defined: False`, never NaN,
so reports stay valid JSON and say what they do not know. (The per-round paired t-test and
Cohen's d over rounds are gone: rounds are not the unit, see validation/ab.py.)
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import stats as _st

from agent_forge.evaluation.metrics import bootstrap_ci, wilson_interval

__all__ = ["sign_test", "mcnemar_exact", "pearson", "bootstrap_mean_diff", "relative_drop",
           "wilson_interval"]


def _pair(a: Sequence[float], b: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"paired samples must be 1-D and equally long, got {x.shape} and {y.shape}")
    return x, y


def sign_test(a: Sequence[float], b: Sequence[float]) -> dict:
    """Exact two-sided sign test of "b is ahead as often as a": a binomial test on the pairs
    that differ, so it needs no assumption about how the differences are distributed.

    only_a: pairs where a is higher; only_b: pairs where b is higher; ties are left out.
    """
    x, y = _pair(a, b)
    only_a, only_b = int(np.sum(x > y)), int(np.sum(y > x))
    n = only_a + only_b
    p = 1.0 if n == 0 else float(_st.binomtest(only_b, n, 0.5).pvalue)
    return {"only_a": only_a, "only_b": only_b, "p": p, "defined": n > 0}


def mcnemar_exact(a_correct: Sequence[bool], b_correct: Sequence[bool]) -> dict:
    """Exact McNemar: the sign test on right/wrong pairs (only_a: a right, b wrong)."""
    return sign_test([float(bool(v)) for v in a_correct], [float(bool(v)) for v in b_correct])


def pearson(x: Sequence[float], y: Sequence[float]) -> dict:
    """Pearson r with its two-sided p-value; r = 0, p = 1 when either side is constant."""
    u, v = _pair(x, y)
    if u.size < 3 or np.ptp(u) == 0 or np.ptp(v) == 0:
        return {"r": 0.0, "p": 1.0, "n": int(u.size), "defined": False}
    res = _st.pearsonr(u, v)
    return {"r": float(res.statistic), "p": float(res.pvalue), "n": int(u.size), "defined": True}


def bootstrap_mean_diff(a: Sequence[float], b: Sequence[float], n_boot: int = 2000,
                        alpha: float = 0.05, seed: int = 0) -> dict:
    """Mean of b - a with a seeded percentile bootstrap interval (pairs resampled together)."""
    x, y = _pair(a, b)
    d = y - x
    lo, hi = bootstrap_ci(d, np.mean, n_boot=n_boot, alpha=alpha, seed=seed)
    return {"mean_diff": float(d.mean()) if d.size else 0.0, "ci": [lo, hi]}


def paired_gain(before: Sequence[bool], after: Sequence[bool], seed: int = 0, n_boot: int = 2000) -> dict:
    """Accuracy change on the same questions: points, a bootstrap 95% interval over the pairs,
    and the exact McNemar p-value; what "this stage raised accuracy" has to be backed by."""
    boot = bootstrap_mean_diff([float(x) for x in before], [float(x) for x in after], n_boot=n_boot, seed=seed)
    return {"points": 100 * boot["mean_diff"], "ci95_points": [100 * x for x in boot["ci"]],
            "mcnemar_p": mcnemar_exact(before, after)["p"], "n": len(before),
            "before": sum(map(bool, before)) / max(len(before), 1),
            "after": sum(map(bool, after)) / max(len(after), 1)}


def relative_drop(before: Sequence[bool], after: Sequence[bool], seed: int = 0, n_boot: int = 2000) -> dict:
    """1 - accuracy after / accuracy before on the same questions, with a seeded percentile
    bootstrap 95% interval (questions resampled as pairs; a resample with nothing right before
    has no ratio and is left out). None when nothing was right before. With nothing right
    after, every resample says 100%: the interval's low end then comes from the Wilson upper
    bound of 0 of n (what the model may still get right) over the accuracy before."""
    x, y = _pair([float(bool(v)) for v in before], [float(bool(v)) for v in after])
    if x.sum() == 0:
        return {"drop": None, "ci95": None}
    if y.sum() == 0:
        return {"drop": 1.0, "ci95": [float(1.0 - wilson_interval(0, x.size)[1] / x.mean()), 1.0]}
    idx = np.random.default_rng(seed).integers(0, x.size, size=(n_boot, x.size))
    right_before, right_after = x[idx].sum(axis=1), y[idx].sum(axis=1)
    keep = right_before > 0
    ratios = 1.0 - right_after[keep] / right_before[keep]
    lo, hi = np.percentile(ratios, [2.5, 97.5])
    return {"drop": float(1.0 - y.sum() / x.sum()), "ci95": [float(lo), float(hi)]}
