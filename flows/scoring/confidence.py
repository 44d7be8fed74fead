"""The gate's statistics: exact one-sided tests on the paired per-item results of two models.

A retention check asks whether the candidate still knows what a reference model (the champion,
or the anchor: the base model, or the version that learned a release) knows. On one probe task,
with the reference right on ``K`` items ("known") and wrong on ``U``, conditional on those
results the candidate's answers are independent draws: right on a known item with probability
``p_k`` (kept), right on an unknown one with probability ``p_u`` (gained).

- ``kept`` (the default): the share of known items the candidate still answers right, ``p_k``.
  The gate passes only if the one-sided exact Clopper–Pearson lower bound at level ``1 - α``

      L(x, K) = Beta⁻¹(α; x, K − x + 1)      (0 when x = 0)

  reaches the threshold ``θ``. ``L ≥ θ`` ⇔ the exact binomial test of H0: p_k ≤ θ rejects at
  ``α`` (P(X ≥ x | K, θ) ≤ α), so a candidate whose true retention is at the threshold passes
  with probability at most ``α`` for every ``K`` (Clopper & Pearson 1934, Biometrika 26:404).
  Gains on other items never cancel a loss.
- ``net`` (``gate.gains_offset_losses: true``): the ratio of accuracies on the task,
  ``(K − lost + gained) / K``, whose expectation is ``p_k + (U/K)·p_u``. Lost and gained items
  are independent binomials given the reference's results, so with the two one-sided
  Clopper–Pearson bounds at ``α/2`` each, ``L_k + (U/K)·L_u`` is a lower bound at level at least
  ``1 − α`` (Bonferroni). Exact and conservative; gains offset losses only through it.

The simulation in ``tests/flows/test_gate_calibration.py`` checks both at the threshold.

Design (how many known items a task needs): with ``K`` known items the test passes iff at least
``c(K)`` are kept, the smallest ``c`` with P(X ≥ c | K, θ) ≤ α. A candidate that truly keeps
``p`` passes with probability P(X ≥ c | K, p). Any loss below ``θ`` is blocked with probability
at least ``1 − α`` (the smallest detectable loss below the threshold is 0 at power ``1 − α``), so
what a small task lacks is the other side: a good candidate cannot pass. ``passes_reliably_at(K)``
is the smallest ``p`` that passes with probability ``gate.power``: the resolution of the task,
reported per task. ``required_known`` is the fewest known items from which on a candidate that
keeps ``gate.design_retention`` passes with probability ``gate.power`` (e.g. 29 known items all
kept are the least that can pass at θ = 0.9, α = 0.05; 0.05^(1/29) = 0.902).

The new-task score gets a two-sided exact (Clopper–Pearson) interval at ``1 − 2α``; its gain
over the champion an exact paired interval from the flipped items (``paired_difference``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import stats


def lower_bound(successes: int, trials: int, alpha: float) -> float:
    """One-sided exact (Clopper–Pearson) lower ``1 − α`` bound of a proportion; 0 without any."""
    if trials == 0 or successes == 0:
        return 0.0
    return float(stats.beta.ppf(alpha, successes, trials - successes + 1))


def upper_bound(successes: int, trials: int, alpha: float) -> float:
    """One-sided exact (Clopper–Pearson) upper ``1 − α`` bound of a proportion; 1 without any."""
    if trials == 0 or successes == trials:
        return 1.0
    return float(stats.beta.ppf(1 - alpha, successes + 1, trials - successes))


def proportion_interval(successes: int, trials: int, alpha: float) -> tuple[float, float]:
    """Two-sided exact (Clopper–Pearson) interval at level ``1 − 2α``: both one-sided bounds."""
    return lower_bound(successes, trials, alpha), upper_bound(successes, trials, alpha)


@dataclass(frozen=True)
class Bound:
    """A gated statistic of one task: its value and one-sided ``1 − α`` bounds."""

    value: float
    low: float
    high: float


def kept_bound(known: int, lost: int, alpha: float) -> Bound:
    """The share of known items kept, ``(K − lost) / K``, with exact one-sided bounds."""
    kept = known - lost
    value = kept / known if known else 1.0
    return Bound(value, lower_bound(kept, known, alpha), upper_bound(kept, known, alpha))


def net_bound(known: int, lost: int, unknown: int, gained: int, alpha: float) -> Bound:
    """The ratio of accuracies ``(K − lost + gained) / K`` with Bonferroni-combined exact bounds
    (each part at ``α/2``): gains offset losses."""
    if known == 0:
        return Bound(1.0, 0.0, 1.0)
    w = unknown / known
    k_low, k_high = proportion_interval(known - lost, known, alpha / 2)
    u_low, u_high = proportion_interval(gained, unknown, alpha / 2) if unknown else (0.0, 0.0)
    return Bound((known - lost + gained) / known, k_low + w * u_low, k_high + w * u_high)


@lru_cache(maxsize=4096)
def critical_kept(known: int, threshold: float, alpha: float) -> int:
    """The fewest kept items that pass with ``known`` items: min c with P(X ≥ c | K, θ) ≤ α
    (``known + 1``: no result can pass)."""
    counts = np.arange(known + 1)
    passing = np.nonzero(stats.binom.sf(counts - 1, known, threshold) <= alpha)[0]
    return int(passing[0]) if passing.size else known + 1


def pass_probability(known: int, true_kept: float, threshold: float, alpha: float) -> float:
    """Probability that a candidate keeping each known item with ``true_kept`` passes."""
    c = critical_kept(known, threshold, alpha)
    return float(stats.binom.sf(c - 1, known, true_kept)) if c <= known else 0.0


def _solve(f, target: float, lo: float, hi: float) -> float:
    """The ``x`` in [lo, hi] where the increasing ``f`` reaches ``target`` (bisection)."""
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if f(mid) < target else (lo, mid)
    return hi


@lru_cache(maxsize=4096)
def passes_reliably_at(known: int, threshold: float, alpha: float, power: float) -> float:
    """The smallest true retention that passes with probability ``power`` (1.0 if none does)."""
    if critical_kept(known, threshold, alpha) > known:
        return 1.0
    f = lambda p: pass_probability(known, p, threshold, alpha)  # noqa: E731
    return 1.0 if f(1.0) < power else _solve(f, power, threshold, 1.0)


@lru_cache(maxsize=256)
def required_known(
    threshold: float, alpha: float, power: float, design_retention: float, limit: int = 1000
) -> int:
    """The fewest known items from which on (every larger count up to ``limit`` too: the pass
    probability is a sawtooth in K) a candidate that keeps ``design_retention`` passes with
    probability ``power``; ``limit`` when none is enough below it. A threshold of 0 needs none:
    every result shows it."""
    if threshold <= 0:
        return 0
    for k in range(limit, 0, -1):
        if pass_probability(k, design_retention, threshold, alpha) < power:
            return min(k + 1, limit)
    return 1


def paired_difference(
    reference: Sequence[bool], candidate: Sequence[bool], alpha: float
) -> tuple[float, float]:
    """Exact two-sided ``1 − 2α`` interval of the candidate's accuracy minus the reference's on
    the same items, from the flipped items: with ``b`` items only the candidate answers and
    ``c`` only the reference, the difference is ``(b − c) / n``; conditional on ``m = b + c``
    flips, ``b ~ Bin(m, π)`` and the difference is ``(m/n)(2π − 1)``, bounded through the exact
    interval of ``π`` (McNemar 1947, exact form; conditional on the number of flips)."""
    a = np.asarray(reference, dtype=bool)
    b = np.asarray(candidate, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"paired results differ in length: {a.shape} and {b.shape}")
    n = a.size
    if n == 0:
        return -1.0, 1.0
    only_candidate, only_reference = int((b & ~a).sum()), int((a & ~b).sum())
    flips = only_candidate + only_reference
    if flips == 0:
        return 0.0, 0.0
    low, high = proportion_interval(only_candidate, flips, alpha)
    return flips / n * (2 * low - 1), flips / n * (2 * high - 1)
