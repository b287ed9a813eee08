"""The statistics the studies report: Pearson's r with a seeded bootstrap interval, Spearman's
rank correlation, AUROC and ROC thresholds, and unit rows of a vector.

Shape legend: N points, B bootstrap resamples, L vector rows, D width.

Two contracts, both kept on purpose: `pearson` raises `UndefinedStatistic` saying why (a monitor
calibrated on nothing must not look calibrated), while `pearson_or_none` and `spearman` return None
(a summary table with an empty cell is still a summary).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from pvjax.errors import InputError

# float32 carries ~7 significant digits: values that agree to that are the same number computed
# twice.
CONSTANT_RTOL = 1e-6


class StatisticError(InputError):
    """Inputs a statistic cannot take: unequal lengths, NaN, a level outside (0, 1)."""


class UndefinedStatistic(StatisticError):
    """A correlation or AUROC that has no value for these inputs (too few points, a constant side,
    one class only); the message says which."""


def unit_rows(vector_LD, *, compute=np.float32) -> np.ndarray:
    """Each row of `vector_LD` scaled to unit norm (a zero row stays zero), as float32; `compute`
    is the precision of the norm and the division (screening and shift divide in float64)."""
    v = np.asarray(vector_LD, compute)
    n = np.linalg.norm(v, axis=-1, keepdims=True)
    return (v / np.where(n > 0, n, np.asarray(1.0, compute))).astype(np.float32)


def is_constant(v: np.ndarray) -> bool:
    return float(np.ptp(v)) <= CONSTANT_RTOL * max(float(np.abs(v).max()), 1e-30)


def pearson(x, y) -> float:
    """Pearson's r of two equally long sequences; `UndefinedStatistic` under 3 points or when a side
    is constant (equal to float32 precision)."""
    x, y = np.asarray(x, np.float64).ravel(), np.asarray(y, np.float64).ravel()
    if len(x) != len(y):
        raise StatisticError(f"r needs pairs: {len(x)} x values but {len(y)} y values")
    if len(x) < 3:
        raise UndefinedStatistic(f"r undefined: {len(x)} points, a correlation needs at least 3")
    for name, v in (("x", x), ("y", y)):
        if not np.all(np.isfinite(v)):
            raise StatisticError(f"{name} contains NaN or infinite values")
        if is_constant(v):
            raise UndefinedStatistic(
                f"r undefined: {name} is constant ({v[0]:.6g} at all {len(v)} points)"
            )
    dx, dy = x - x.mean(), y - y.mean()
    return float(np.clip((dx * dy).sum() / np.sqrt((dx * dx).sum() * (dy * dy).sum()), -1.0, 1.0))


def pearson_or_none(x, y) -> float | None:
    """Pearson's r, None when either side is constant or has fewer than 3 points."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 3 or np.std(x) == 0 or np.std(y) == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def average_ranks(v) -> np.ndarray:
    """0-based ranks of `v`, ties sharing their mean rank."""
    v = np.asarray(v)
    order = np.argsort(v, kind="mergesort")
    r = np.empty(len(v))
    r[order] = np.arange(len(v), dtype=float)
    for u in np.unique(v):
        m = v == u
        r[m] = r[m].mean()
    return r


def spearman(x, y) -> float | None:
    """Spearman's rank correlation (average ranks for ties); None under 3 points or a constant
    side."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 3:
        return None
    rx, ry = average_ranks(x), average_ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def _pearson_rows(x_BN, y_BN) -> np.ndarray:
    """r of each row pair, NaN where a row is constant."""
    dx = x_BN - x_BN.mean(-1, keepdims=True)
    dy = y_BN - y_BN.mean(-1, keepdims=True)
    sxx, syy = (dx * dx).sum(-1), (dy * dy).sum(-1)

    def flat(v):
        return np.ptp(v, axis=-1) <= CONSTANT_RTOL * np.maximum(np.abs(v).max(-1), 1e-30)

    ok = ~(flat(x_BN) | flat(y_BN))
    r = np.full(x_BN.shape[0], np.nan)
    r[ok] = np.clip((dx * dy).sum(-1)[ok] / np.sqrt(sxx[ok] * syy[ok]), -1.0, 1.0)
    return r


def bootstrap_indices(n: int, n_boot: int, seed: int) -> np.ndarray:
    """`[B, n]` resampling indices: `numpy.random.default_rng(seed).integers(0, n, (n_boot, n))`.
    The same seed draws the same resamples, so every layer is resampled alike."""
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


@dataclasses.dataclass(frozen=True)
class Correlation:
    """r with its percentile bootstrap interval at `level`; `n_boot_used` counts the resamples with
    a defined r (a resample that repeats one point is constant and is dropped)."""

    r: float
    low: float
    high: float
    n: int
    n_boot_used: int


def bootstrap_pearson(
    x, y, *, n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> Correlation:
    """Pearson's r and its percentile bootstrap interval: resample the n (x, y) pairs with
    replacement `n_boot` times (`bootstrap_indices`), take r of each, and report the
    `(1 - level) / 2` and `(1 + level) / 2` quantiles (numpy's linear interpolation). Raises as
    `pearson` does; the interval is undefined (an error) when under half the resamples have an r."""
    r = pearson(x, y)
    if not 0 < level < 1:
        raise StatisticError(f"level must be in (0, 1), got {level}")
    if n_boot < 1:
        raise StatisticError(f"n_boot must be >= 1, got {n_boot}")
    x, y = np.asarray(x, np.float64).ravel(), np.asarray(y, np.float64).ravel()
    idx = bootstrap_indices(len(x), n_boot, seed)
    rs = _pearson_rows(x[idx], y[idx])
    rs = rs[np.isfinite(rs)]
    if len(rs) < max(1, n_boot // 2):
        raise UndefinedStatistic(
            f"bootstrap interval undefined: only {len(rs)} of {n_boot} resamples of "
            f"{len(x)} points have a defined r"
        )
    low, high = np.quantile(rs, [(1 - level) / 2, (1 + level) / 2])
    return Correlation(r, float(low), float(high), len(x), len(rs))


def auroc(scores, labels) -> float:
    """Area under the ROC curve of `scores` for boolean `labels`: the probability that a random
    positive scores above a random negative, ties counting one half (Mann-Whitney U / (n+ n-))."""
    s = np.asarray(scores, np.float64).ravel()
    y = np.asarray(labels, bool).ravel()
    if len(s) != len(y):
        raise StatisticError(f"{len(s)} scores but {len(y)} labels")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise UndefinedStatistic(
            f"AUROC undefined: {n_pos} positive and {n_neg} negative points; it needs both classes"
        )
    ranks = average_ranks(s) + 1.0
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_points(scores, labels) -> list[tuple[float, float, float]]:
    """`(threshold, tpr, fpr)` for every distinct decision `score >= threshold`: the lowest score
    (everything flagged), the midpoints between consecutive distinct scores, and just above the
    highest (nothing flagged). Midpoints keep a threshold away from the calibration points."""
    s = np.asarray(scores, np.float64).ravel()
    y = np.asarray(labels, bool).ravel()
    u = np.unique(s)
    cands = [u[0], *((u[:-1] + u[1:]) / 2), np.nextafter(u[-1], np.inf)]
    n_pos, n_neg = max(int(y.sum()), 1), max(int((~y).sum()), 1)
    return [
        (float(t), float((s[y] >= t).sum() / n_pos), float((s[~y] >= t).sum() / n_neg))
        for t in cands
    ]


def separation(positive, negative) -> float:
    """AUROC of two groups, NaN dropped: how well a score ranks the positives above the negatives
    (screening: trait samples above control samples)."""
    p, n = np.asarray(positive, float), np.asarray(negative, float)
    p, n = p[~np.isnan(p)], n[~np.isnan(n)]
    if not len(p) or not len(n):
        raise StatisticError("auroc needs at least one scored sample on each side")
    return auroc(np.concatenate([p, n]), np.arange(len(p) + len(n)) < len(p))


# Two-sided 97.5% quantiles of Student's t for 1..9 degrees of freedom; beyond, the
# Cornish-Fisher expansion around the normal quantile (within 0.002 of the exact value).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262)


def mean_interval(values) -> tuple[float | None, float | None, float | None]:
    """`(mean, low, high)`: the mean of `values` and its 95% interval by Student's t (the values
    taken as independent draws, e.g. one per seed); the interval is None for fewer than two
    values, and everything None for none."""
    x = np.asarray([v for v in values if v is not None], np.float64)
    if x.size == 0:
        return None, None, None
    m = float(x.mean())
    if x.size < 2:
        return m, None, None
    nu = x.size - 1
    z = 1.959964
    t = (
        _T975[nu - 1]
        if nu <= len(_T975)
        else z + (z**3 + z) / (4 * nu) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * nu**2)
    )
    half = t * float(x.std(ddof=1)) / np.sqrt(x.size)
    return m, m - half, m + half
