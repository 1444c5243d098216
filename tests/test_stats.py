"""Each statistic against a slow, obviously-right version."""

import math
import random

import numpy as np
import pytest

from agent_forge.validation.stats import (
    bootstrap_mean_diff, mcnemar_exact, pearson, sign_test,
)


def _rand(n, seed):
    r = random.Random(seed)
    return [r.gauss(0, 1) for _ in range(n)]


def _mcnemar_by_sum(only_a, only_b):
    """Two-sided exact p: twice the smaller binomial tail, capped at 1."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    k = min(only_a, only_b)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


@pytest.mark.parametrize("only_a,only_b,both,neither", [(1, 9, 5, 5), (3, 3, 10, 0), (0, 6, 2, 2),
                                                        (7, 2, 0, 1), (0, 0, 4, 4), (12, 30, 40, 18)])
def test_mcnemar_matches_binomial_sum(only_a, only_b, both, neither):
    a = [1] * only_a + [0] * only_b + [1] * both + [0] * neither
    b = [0] * only_a + [1] * only_b + [1] * both + [0] * neither
    res = mcnemar_exact(a, b)
    assert (res["only_a"], res["only_b"]) == (only_a, only_b)
    assert res["p"] == pytest.approx(_mcnemar_by_sum(only_a, only_b))


def test_sign_test_on_item_scores_matches_binomial_sum():
    """Fractional per-item scores (mean correctness over rounds): only the sign of each
    difference counts, ties are dropped."""
    a = [0, 1 / 3, 2 / 3, 1, 0.5, 0.5, 0, 1, 1 / 3, 0]
    b = [1, 2 / 3, 2 / 3, 0, 1.0, 0.5, 1 / 3, 1, 1, 2 / 3]  # b ahead on 6, a on 1, 3 ties
    res = sign_test(a, b)
    assert (res["only_a"], res["only_b"], res["defined"]) == (1, 6, True)
    assert res["p"] == pytest.approx(_mcnemar_by_sum(1, 6))
    assert sign_test(a, a) == {"only_a": 0, "only_b": 0, "p": 1.0, "defined": False}


def _pearson_by_hand(x, y):
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((u - mx) * (v - my) for u, v in zip(x, y))
    sx = math.sqrt(sum((u - mx) ** 2 for u in x))
    sy = math.sqrt(sum((v - my) ** 2 for v in y))
    r = sxy / (sx * sy)
    t = r * math.sqrt((n - 2) / (1 - r * r))
    return r, t


def test_pearson_matches_hand_formula_and_t_distribution():
    from scipy.stats import t as t_dist

    x = _rand(15, 3)
    y = [u * 0.8 + e for u, e in zip(x, _rand(15, 4))]
    res = pearson(x, y)
    r, t = _pearson_by_hand(x, y)
    assert res["r"] == pytest.approx(r) and res["defined"]
    assert res["p"] == pytest.approx(2 * t_dist.sf(abs(t), 13))
    assert pearson([1, 1, 1, 1], [1, 2, 3, 4]) == {"r": 0.0, "p": 1.0, "n": 4, "defined": False}


def test_bootstrap_mean_diff_matches_normal_theory():
    """With 300 pairs the percentile bootstrap of a mean difference is close to the textbook
    mean +- 1.96 sd / sqrt(n) interval; pairs are resampled together, so a shift shared by
    both arms does not widen it."""
    a = _rand(300, 5)
    b = [x + 0.2 + 0.5 * e for x, e in zip(a, _rand(300, 6))]
    d = np.array(b) - np.array(a)
    half = 1.959963984540054 * d.std(ddof=1) / math.sqrt(d.size)
    res = bootstrap_mean_diff(a, b, n_boot=4000, seed=11)
    assert res["mean_diff"] == pytest.approx(d.mean())
    assert res["ci"][0] == pytest.approx(d.mean() - half, abs=0.08 * half)
    assert res["ci"][1] == pytest.approx(d.mean() + half, abs=0.08 * half)
    assert bootstrap_mean_diff(a, b, n_boot=4000, seed=11) == res  # seeded


def test_unpaired_input_rejected():
    with pytest.raises(ValueError):
        bootstrap_mean_diff([1, 2, 3], [1, 2])


def test_paired_gain_by_hand():
    from agent_forge.validation.stats import paired_gain

    before = [True] * 10 + [False] * 30 + [True] * 2 + [False] * 8   # 12 / 50
    after = [True] * 10 + [True] * 12 + [False] * 18 + [False] * 10  # 22 / 50; 12 gained, 2 lost
    g = paired_gain(before, after)
    assert g["points"] == pytest.approx(100 * (22 - 12) / 50) and g["n"] == 50
    assert (g["before"], g["after"]) == (pytest.approx(0.24), pytest.approx(0.44))
    want_p = min(1.0, 2 * sum(math.comb(14, k) for k in range(0, 3)) / 2 ** 14)  # 2 of 14 discordant
    assert g["mcnemar_p"] == pytest.approx(want_p)
    lo, hi = g["ci95_points"]
    assert 0 < lo < g["points"] < hi  # a clear gain: the interval excludes zero
    same = paired_gain(before, before)
    assert same["points"] == 0 and same["ci95_points"] == [0.0, 0.0] and same["mcnemar_p"] == 1.0


def test_relative_drop_matches_the_delta_method():
    """1 - (right after / right before) over 400 paired questions: the percentile bootstrap
    interval is close to the delta method's R +- 1.96 sd(y - R x) / (sqrt(n) mean(x)), the
    textbook interval of a ratio of paired means; edge cases say what they do not know."""
    from agent_forge.validation.stats import relative_drop

    r = random.Random(3)
    before = [r.random() < 0.6 for _ in range(400)]
    after = [b and r.random() < 0.8 or (not b and r.random() < 0.1) for b in before]
    x, y = np.array(before, float), np.array(after, float)
    ratio = y.mean() / x.mean()
    half = 1.959963984540054 * (y - ratio * x).std(ddof=1) / (math.sqrt(x.size) * x.mean())
    res = relative_drop(before, after, n_boot=4000, seed=2)
    assert res["drop"] == pytest.approx(1 - y.sum() / x.sum())
    assert res["ci95"][0] == pytest.approx(1 - ratio - half, abs=0.1 * half)
    assert res["ci95"][1] == pytest.approx(1 - ratio + half, abs=0.1 * half)
    assert relative_drop(before, before) == {"drop": 0.0, "ci95": [0.0, 0.0]}
    assert relative_drop([False] * 5, [True] * 5) == {"drop": None, "ci95": None}
    # nothing right after (22 of 40 before): not "exactly 100%", the model may still get up to
    # Wilson's 8.8% of questions right
    wiped = relative_drop([True] * 22 + [False] * 18, [False] * 40)
    assert wiped["drop"] == 1.0 and wiped["ci95"][1] == 1.0
    assert wiped["ci95"][0] == pytest.approx(1 - 0.0876 / 0.55, abs=2e-3)
    with pytest.raises(ValueError):
        relative_drop([True, False], [True])
