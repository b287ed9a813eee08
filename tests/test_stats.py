"""`pvjax.measure.stats`: every statistic against a hand computation (or scipy where it has one),
and the two forms that replaced duplicates (screening's pairwise AUROC, float64 unit rows) bit for
bit against the formulas they replaced."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from pvjax.measure import stats


def hand_r(x, y):
    """Pearson's r from the textbook sums, in plain Python."""
    n = len(x)
    sx, sy = sum(x), sum(y)
    sxx, syy, sxy = sum(a * a for a in x), sum(b * b for b in y), sum(a * b for a, b in zip(x, y))
    return (n * sxy - sx * sy) / math.sqrt((n * sxx - sx * sx) * (n * syy - sy * sy))


def hand_quantile(values, q):
    """The linear-interpolation quantile: position q (n-1) in the sorted values."""
    v = sorted(values)
    pos = q * (len(v) - 1)
    lo = math.floor(pos)
    return v[lo] + (v[min(lo + 1, len(v) - 1)] - v[lo]) * (pos - lo)


X = [1.0, 2.0, 4.0, 3.5, 7.0, 5.5, 2.5]
Y = [0.3, 0.1, 0.9, 0.4, 1.6, 0.7, 0.8]


X = [1.0, 2.0, 4.0, 3.5, 7.0, 5.5, 2.5]
Y = [0.3, 0.1, 0.9, 0.4, 1.6, 0.7, 0.8]


def test_pearson_matches_the_textbook_sums():
    assert stats.pearson(X, Y) == pytest.approx(hand_r(X, Y), abs=1e-12)
    assert stats.pearson(X, [-v for v in Y]) == pytest.approx(-hand_r(X, Y), abs=1e-12)
    assert stats.pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)


def test_bootstrap_interval_is_the_percentile_of_resampled_r():
    c = stats.bootstrap_pearson(X, Y, n_boot=300, level=0.9, seed=7)
    idx = np.random.default_rng(7).integers(0, len(X), size=(300, len(X)))
    rs = []
    for row in idx.tolist():
        xs, ys = [X[i] for i in row], [Y[i] for i in row]
        if len(set(xs)) > 1 and len(set(ys)) > 1:
            rs.append(hand_r(xs, ys))
    assert c.r == pytest.approx(hand_r(X, Y), abs=1e-12)
    assert c.n_boot_used == len(rs) and c.n == len(X)
    assert c.low == pytest.approx(hand_quantile(rs, 0.05), abs=1e-9)
    assert c.high == pytest.approx(hand_quantile(rs, 0.95), abs=1e-9)
    assert c.low <= c.r <= c.high
    # seeded: the same seed gives the same interval, another seed another one
    assert stats.bootstrap_pearson(X, Y, n_boot=300, level=0.9, seed=7) == c
    assert stats.bootstrap_pearson(X, Y, n_boot=300, level=0.9, seed=8) != c


def test_undefined_correlations_say_why():
    with pytest.raises(stats.UndefinedStatistic, match="2 points, a correlation needs at least 3"):
        stats.pearson([1, 2], [3, 4])
    with pytest.raises(stats.UndefinedStatistic, match="x is constant"):
        stats.pearson([5, 5, 5, 5], [1, 2, 3, 4])
    with pytest.raises(stats.UndefinedStatistic, match="y is constant"):
        stats.pearson([1, 2, 3, 4], [0.5] * 4)
    with pytest.raises(stats.StatisticError, match="3 x values but 2 y values"):
        stats.pearson([1, 2, 3], [1, 2])


def test_auroc_is_the_pairwise_count():
    rng = np.random.default_rng(0)
    s = rng.integers(0, 6, 40).astype(float)  # many ties
    y = rng.random(40) < 0.4
    pairs = [(a, b) for a, b in itertools.product(s[y], s[~y])]
    brute = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs) / len(pairs)
    assert stats.auroc(s, y) == pytest.approx(brute, abs=1e-12)
    with pytest.raises(stats.UndefinedStatistic, match="0 positive and 3 negative"):
        stats.auroc([1, 2, 3], [False] * 3)


def test_spearman_matches_scipy():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    x = rng.normal(size=40)
    y = x + rng.normal(size=40)
    y[:5] = y[5]  # ties
    assert stats.spearman(x, y) == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)
    assert stats.spearman([1, 2], [1, 2]) is None and stats.spearman([1, 1, 1], [1, 2, 3]) is None


def test_separation_is_the_old_pairwise_count_bit_for_bit():
    rng = np.random.default_rng(1)
    for _ in range(20):
        p = rng.integers(0, 7, rng.integers(1, 30)).astype(float)
        n = rng.integers(0, 7, rng.integers(1, 30)).astype(float)
        p[rng.random(len(p)) < 0.1] = np.nan
        n[0] = np.nan
        pp, nn = p[~np.isnan(p)], n[~np.isnan(n)]
        if not len(pp) or not len(nn):
            continue
        old = ((pp[:, None] > nn[None]).sum() + 0.5 * (pp[:, None] == nn[None]).sum()) / (
            len(pp) * len(nn)
        )
        assert stats.separation(p, n) == float(old)
    with pytest.raises(stats.StatisticError, match="at least one scored sample on each side"):
        stats.separation([np.nan], [1.0])


def test_unit_rows_in_either_precision_are_the_old_formulas_bit_for_bit():
    v = np.random.default_rng(2).normal(size=(5, 33)).astype(np.float32)
    v[2] = 0
    v32 = v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)
    n64 = np.linalg.norm(v.astype(np.float64), axis=-1, keepdims=True)
    v64 = (v.astype(np.float64) / np.where(n64 > 0, n64, 1.0)).astype(np.float32)
    assert np.array_equal(stats.unit_rows(v), v32) and stats.unit_rows(v).dtype == np.float32
    assert np.array_equal(stats.unit_rows(v, compute=np.float64), v64)
    assert not np.any(stats.unit_rows(v)[2])


def test_pearson_or_none():
    assert stats.pearson_or_none(X, Y) == pytest.approx(hand_r(X, Y), abs=1e-12)
    assert stats.pearson_or_none([1, 2], [1, 2]) is None
    assert stats.pearson_or_none([1, 1, 1], [1, 2, 3]) is None
