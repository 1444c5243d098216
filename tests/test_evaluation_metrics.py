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


def test_bootstrap_matches_loop_version():
    x = np.array([0.1, 0.5, -0.2, 0.9, 0.3, 0.0, 0.7])
    lo, hi = bootstrap_ci(x, n_boot=500, seed=7)
    rng = np.random.default_rng(7)
    idx = rng.integers(0, len(x), size=(500, len(x)))
    means = sorted(sum(x[j] for j in row) / len(row) for row in idx)
    assert lo == pytest.approx(np.quantile(means, 0.025))
    assert hi == pytest.approx(np.quantile(means, 0.975))
    assert lo < x.mean() < hi
    assert bootstrap_ci(x, n_boot=500, seed=7) == (lo, hi)  # seeded
