"""Wilson interval and bootstrap against slow, obviously-right versions."""

import numpy as np
import pytest

from agent_forge.evaluation.metrics import accuracy_summary, bootstrap_ci, wilson_interval


def _wilson_by_scan(k, n, z=1.959963984540054):
    """All p with (p_hat - p)^2 <= z^2 p (1 - p) / n, found on a fine grid."""
    p = np.linspace(0, 1, 200001)
    inside = p[(k / n - p) ** 2 <= z * z * p * (1 - p) / n]
    return inside.min(), inside.max()


@pytest.mark.parametrize("k,n", [(0, 10), (3, 10), (10, 10), (27, 30), (150, 300), (1, 2)])
def test_wilson_matches_scan(k, n):
    lo, hi = wilson_interval(k, n)
    slo, shi = _wilson_by_scan(k, n)
    assert lo == pytest.approx(slo, abs=2e-5) and hi == pytest.approx(shi, abs=2e-5)


def test_wilson_empty_and_summary():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    s = accuracy_summary([True, False, True, True])
    assert s["accuracy"] == 0.75 and s["n"] == 4 and s["ci95"] == list(wilson_interval(3, 4))


def test_wilson_other_levels_match_scan():
    lo, hi = wilson_interval(7, 20, z=1.0)
    slo, shi = _wilson_by_scan(7, 20, z=1.0)
    assert lo == pytest.approx(slo, abs=2e-5) and hi == pytest.approx(shi, abs=2e-5)


def test_bootstrap_matches_normal_theory_and_order_statistics():
    """The mean's interval on 400 values is close to mean +- 1.96 sd / sqrt(n); a median's is
    bracketed by the order statistics a binomial count puts around the middle."""
    x = np.random.default_rng(3).normal(10.0, 2.0, 400)
    lo, hi = bootstrap_ci(x, n_boot=4000, seed=7)
    half = 1.959963984540054 * x.std(ddof=1) / np.sqrt(x.size)
    assert lo == pytest.approx(x.mean() - half, abs=0.08 * half)
    assert hi == pytest.approx(x.mean() + half, abs=0.08 * half)
    assert bootstrap_ci(x, n_boot=4000, seed=7) == (lo, hi)  # seeded
    mlo, mhi = bootstrap_ci(x, stat=np.median, n_boot=2000, seed=7)
    s = np.sort(x)  # distribution-free 95% median interval: ranks 200 -+ 1.96 * 10, 5 ranks of slack
    assert s[175] <= mlo <= np.median(x) <= mhi <= s[224]


def test_bootstrap_degenerate_inputs():
    assert all(np.isnan(bootstrap_ci([])))
    assert bootstrap_ci([0.3]) == (0.3, 0.3)
    assert bootstrap_ci([0.0] * 5) == (0.0, 0.0)
