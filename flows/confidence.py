"""Confidence intervals for the gate, from the paired per-item results of champion and candidate.

Retention (candidate accuracy / champion accuracy on a probe task) and the new-task gain
(candidate − champion) are statistics of *paired* right/wrong outcomes: the same items answered
by two models. Their intervals come from a paired percentile bootstrap over items
(``scipy.stats.bootstrap`` with ``paired=True``; Efron & Tibshirani 1993, ch. 13): a resample
draws items, and both models' answers to a drawn item travel together, so the strong correlation
between the two models (most items are right for both or wrong for both) narrows the interval
as it should, and only the items that flipped make it wide.

Why not an exact test on the flipped items (McNemar's): it tests "no change", not "retention is
at least 0.9", and gives no interval for a ratio. Proportions of one model (the new-task score,
the share of the champion's known items the candidate still answers right) get exact
Clopper–Pearson intervals instead (``scipy.stats.binomtest``).

The bootstrap is seeded: the same items give the same interval, so a decision reproduces.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import stats

RESAMPLES = 4000


def _ratio(champion: np.ndarray, candidate: np.ndarray, axis: int = -1) -> np.ndarray:
    """candidate accuracy / champion accuracy; 1.0 where the champion scored 0 (nothing to lose)."""
    base, cand = champion.mean(axis=axis), candidate.mean(axis=axis)
    return np.where(base > 0, cand / np.where(base > 0, base, 1.0), 1.0)


def _difference(champion: np.ndarray, candidate: np.ndarray, axis: int = -1) -> np.ndarray:
    return candidate.mean(axis=axis) - champion.mean(axis=axis)


STATISTICS = {"ratio": _ratio, "difference": _difference}


def paired_interval(
    champion: Sequence[bool],
    candidate: Sequence[bool],
    statistic: str,
    confidence: float,
    seed: int = 0,
) -> tuple[float, float]:
    """Two-sided ``confidence`` interval of ``statistic`` ("ratio" or "difference") of the
    candidate's accuracy against the champion's on the same items, by paired bootstrap."""
    fn = STATISTICS[statistic]
    a = np.asarray(champion, dtype=float)
    b = np.asarray(candidate, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired results differ in length: {a.shape} and {b.shape}")
    point = float(fn(a, b))
    if a.size < 2 or np.array_equal(a, b):
        # Identical answers on every item: every resample gives the same value. (With fewer than
        # two items nothing can be resampled; such a task is reported as too small anyway.)
        return point, point
    result = stats.bootstrap(
        (a, b),
        fn,
        paired=True,
        vectorized=True,
        n_resamples=RESAMPLES,
        confidence_level=confidence,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    low, high = result.confidence_interval
    return float(min(low, point)), float(max(high, point))


def proportion_interval(successes: int, trials: int, confidence: float) -> tuple[float, float]:
    """Exact (Clopper–Pearson) two-sided interval of a proportion; (0, 1) without trials."""
    if trials == 0:
        return 0.0, 1.0
    ci = stats.binomtest(successes, trials).proportion_ci(confidence, method="exact")
    return float(ci.low), float(ci.high)
