"""Wilson interval and bootstrap against slow, obviously-right versions."""

import numpy as np
import pytest

from agent_forge.evaluation.metrics import (accuracy_summary, bootstrap_ci, clearly_above, clearly_below,
                                            difference_verdict, mean_interval, paired_difference, wilson_interval)


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


def test_mean_interval_is_students_t_written_out():
    """mean +- t(0.975, n - 1) x s / sqrt(n), with s the sample standard deviation."""
    from scipy import stats

    x = np.random.default_rng(3).normal(2.0, 0.5, size=12)
    got = mean_interval(x)
    half = stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x))
    assert got["mean"] == pytest.approx(x.mean()) and got["n"] == 12
    assert got["ci95"] == pytest.approx([x.mean() - half, x.mean() + half])


def test_mean_interval_covers_the_true_mean_about_95_percent_of_the_time():
    """Over 2000 samples of 8 normal values, the interval holds the true mean 93.5-96.5% of
    the time (a wrong quantile, z instead of t, covers ~92%; a missing sqrt far less)."""
    rng = np.random.default_rng(0)
    hits = sum(lo <= 1.0 <= hi for lo, hi in (mean_interval(rng.normal(1.0, 2.0, 8))["ci95"] for _ in range(2000)))
    assert 0.935 <= hits / 2000 <= 0.965


def test_mean_interval_degenerate_inputs():
    assert mean_interval([])["ci95"] is None and mean_interval([1.5]) == {"mean": 1.5, "ci95": None, "n": 1}
    assert mean_interval([0.7, 0.7, 0.7])["ci95"] == pytest.approx([0.7, 0.7])  # no spread: the point


def test_paired_difference_pairs_unit_by_unit():
    """A steady 0.1 gap between two noisy series is found by pairing (the interval excludes 0)
    though the two unpaired intervals overlap; mismatched lengths are refused."""
    rng = np.random.default_rng(1)
    base = rng.normal(3.0, 1.0, 30)
    b = base + 0.1 + rng.normal(0, 0.01, 30)
    diff = paired_difference(base, b)
    assert diff == mean_interval(base - b)
    assert diff["ci95"][1] < 0
    assert mean_interval(base)["ci95"][1] > mean_interval(b)["ci95"][0]  # unpaired: overlapping
    assert difference_verdict(diff, "lower", "higher", "tie") == "lower"
    assert difference_verdict(paired_difference(b, base), "lower", "higher", "tie") == "higher"
    assert difference_verdict(paired_difference(base, base + rng.normal(0, 1, 30)), "l", "h", "tie") == "tie"
    assert difference_verdict({"mean": -1.0, "ci95": None}, "l", "h", "tie") == "tie"
    assert clearly_below(diff) and not clearly_above(diff) and clearly_above(paired_difference(b, base))
    assert not clearly_below({"mean": -1.0, "ci95": [-2.0, 0.0]})  # touching 0 is not below it
    with pytest.raises(ValueError, match="do not pair"):
        paired_difference([1, 2], [1, 2, 3])
