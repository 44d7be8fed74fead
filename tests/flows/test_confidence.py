"""The gate's intervals on hand-made cases: closed forms, pairing, and coverage by simulation."""

from __future__ import annotations

import numpy as np
import pytest

from flows.confidence import paired_interval, proportion_interval
from flows.evaluate import task_retention


def test_clopper_pearson_matches_its_closed_form_at_the_edges():
    # 0 of n: upper = 1 - (α/2)^(1/n); n of n: lower = (α/2)^(1/n).
    alpha, n = 0.1, 10
    assert proportion_interval(0, n, 0.9) == pytest.approx((0.0, 1 - (alpha / 2) ** (1 / n)))
    assert proportion_interval(n, n, 0.9) == pytest.approx(((alpha / 2) ** (1 / n), 1.0))
    low, high = proportion_interval(19, 30, 0.9)
    assert 0.46 < low < 0.47 and 0.77 < high < 0.78  # the demo's 19 of 30 on the new task


def test_identical_answers_give_a_point_interval():
    a = [True] * 30 + [False] * 10
    assert paired_interval(a, a, "ratio", 0.9) == (1.0, 1.0)
    assert paired_interval(a, a, "difference", 0.9) == (0.0, 0.0)


def test_the_interval_is_paired_one_flip_in_a_hundred_items_is_narrow():
    champion = [True] * 50 + [False] * 50
    candidate = list(champion)
    candidate[0] = False  # one known item lost
    low, high = paired_interval(champion, candidate, "ratio", 0.9)
    assert low <= 0.98 <= high
    assert low > 0.93  # unpaired, two accuracies of 0.5 on 100 items, it would be ±0.2 wide
    # Resampling the two models independently ignores that they agree on 99 items: far wider.
    rng = np.random.default_rng(0)
    a, b = np.array(champion, float), np.array(candidate, float)
    ratios = [
        rng.choice(b, 100).mean() / rng.choice(a, 100).mean() for _ in range(2000)
    ]  # the unpaired bootstrap, by hand
    assert np.quantile(ratios, 0.05) < 0.85


def test_more_lost_items_move_the_whole_interval_down():
    champion = [True] * 40 + [False] * 40
    intervals = []
    for lost in (1, 4, 8):
        candidate = [i >= lost for i in range(40)] + [False] * 40
        intervals.append(paired_interval(champion, candidate, "ratio", 0.9))
    assert intervals[0][0] > intervals[1][0] > intervals[2][0]
    assert intervals[0][1] > intervals[1][1] > intervals[2][1]
    assert intervals[2][1] < 0.9  # 8 of 40 known items lost: clearly below a 0.9 threshold


def test_ninety_percent_intervals_cover_the_true_retention_about_ninety_percent_of_the_time():
    """Items where the champion is right with p=0.6; the candidate keeps each known item with
    probability 0.85 and learns an unknown one with probability 0.02: true retention is
    (0.6·0.85 + 0.4·0.02) / 0.6 ≈ 0.863."""
    rng = np.random.default_rng(1)
    truth = (0.6 * 0.85 + 0.4 * 0.02) / 0.6
    covered, trials = 0, 150
    for seed in range(trials):
        champion = rng.random(120) < 0.6
        candidate = np.where(champion, rng.random(120) < 0.85, rng.random(120) < 0.02)
        low, high = paired_interval(champion, candidate, "ratio", 0.9, seed=seed)
        covered += low <= truth <= high
    assert 0.8 <= covered / trials <= 0.97


def test_task_retention_counts_known_lost_and_gained_items():
    champion = [True, True, True, True, False, False]
    candidate = [True, False, True, True, True, False]
    stats = task_retention(champion, candidate, min_known=5, confidence=0.9)
    assert (stats.n, stats.known, stats.lost, stats.gained) == (6, 4, 1, 1)
    assert stats.retention == pytest.approx((4 / 6) / (4 / 6))
    assert stats.known_retained == pytest.approx(0.75)
    assert stats.too_small  # 4 known items < 5
    assert stats.retention_low < 1.0 <= stats.retention_high  # one lost, one gained
