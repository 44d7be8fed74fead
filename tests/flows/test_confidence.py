"""The gate's statistics on hand-made cases: closed forms, the design and the paired gain."""

from __future__ import annotations

import pytest
from scipy import stats

from flows.core.config import GateConfig
from flows.scoring import confidence
from flows.steps.evaluate import task_retention


def test_clopper_pearson_bounds_match_their_closed_forms_at_the_edges():
    # n of n: lower = α^(1/n); 0 of n: upper = 1 - α^(1/n).
    alpha, n = 0.05, 30
    assert confidence.lower_bound(n, n, alpha) == pytest.approx(alpha ** (1 / n))
    assert confidence.upper_bound(0, n, alpha) == pytest.approx(1 - alpha ** (1 / n))
    assert confidence.lower_bound(0, n, alpha) == 0.0 and confidence.upper_bound(n, n, alpha) == 1
    # 29 of 30 kept: the bound the issue quotes at a two-sided 90% level (one-sided 5%).
    assert confidence.lower_bound(29, 30, 0.05) == pytest.approx(0.851, abs=5e-4)


def test_the_lower_bound_passes_exactly_when_the_binomial_test_rejects():
    """L >= θ  ⇔  P(X >= x | K, θ) <= α, for every count: the test and the bound are one."""
    for known in (5, 12, 30, 60, 200):
        for kept in range(known + 1):
            bound = confidence.lower_bound(kept, known, 0.05) >= 0.9
            test = stats.binom.sf(kept - 1, known, 0.9) <= 0.05
            assert bound == test, (known, kept)
        c = confidence.critical_kept(known, 0.9, 0.05)
        if c <= known:  # else no count can pass (5 and 12 known items)
            assert confidence.lower_bound(c, known, 0.05) >= 0.9
        assert confidence.lower_bound(min(c, known + 1) - 1, known, 0.05) < 0.9


def test_nothing_lost_is_not_proof_with_few_items():
    """Zero losses out of 12 known items: the share kept could still be 0.78 at 95%."""
    gate = GateConfig()
    stats12 = task_retention([True] * 12, [True] * 12, 0.9, gate, needed_known=89)
    assert stats12.value == 1.0 and stats12.low == pytest.approx(0.05 ** (1 / 12))
    assert stats12.low < 0.9 and stats12.too_small
    assert confidence.critical_kept(28, 0.9, 0.05) == 29  # 28 known items can never pass
    assert confidence.critical_kept(29, 0.9, 0.05) == 29


def test_gains_do_not_offset_losses_unless_the_setting_says_so():
    reference = [True] * 100 + [False] * 100
    candidate = [True] * 90 + [False] * 10 + [True] * 20 + [False] * 80  # lost 10, gained 20
    kept = task_retention(reference, candidate, 0.9, GateConfig(), 89)
    assert (kept.known, kept.lost, kept.gained) == (100, 10, 20)
    assert kept.value == pytest.approx(0.9) and kept.retention == pytest.approx(1.1)
    assert kept.low < 0.9 and "kept" in kept.method
    net = task_retention(reference, candidate, 0.9, GateConfig(gains_offset_losses=True), 89)
    assert net.statistic == "net" and net.value == pytest.approx(1.1)
    assert net.low >= 0.9  # the gains count, at a Bonferroni-exact level


def test_the_design_asks_for_enough_known_items_for_a_good_candidate_to_pass():
    need = confidence.required_known(0.9, 0.05, 0.8, 0.97)
    assert 60 <= need <= 120
    for k in range(need, need + 200):
        assert confidence.pass_probability(k, 0.97, 0.9, 0.05) >= 0.8
    assert confidence.pass_probability(need - 1, 0.97, 0.9, 0.05) < 0.8
    # resolution of a task: what a candidate must keep to pass 80% of the time
    assert confidence.passes_reliably_at(12, 0.9, 0.05, 0.8) == 1.0  # nothing passes
    assert 0.94 < confidence.passes_reliably_at(200, 0.9, 0.05, 0.8) < 0.96


def test_the_paired_gain_interval_comes_from_the_flips():
    a = [True] * 30 + [False] * 30
    assert confidence.paired_difference(a, a, 0.05) == (0.0, 0.0)
    b = [True] * 30 + [True] * 12 + [False] * 18  # 12 gained, none lost: gain 0.2
    low, high = confidence.paired_difference(a, b, 0.05)
    assert low > 0 and high == pytest.approx(0.2)  # every flip is a gain
    with pytest.raises(ValueError, match="differ in length"):
        confidence.paired_difference(a, b[:-1], 0.05)
