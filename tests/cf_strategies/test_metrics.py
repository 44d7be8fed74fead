"""Continual-learning metrics on a hand-computed 3-task accuracy matrix."""

import numpy as np
import pytest

from cf_strategies.metrics import (
    average_accuracy,
    backward_transfer,
    forgetting,
    forward_transfer,
    retention,
    summary,
)

# R[i][j]: accuracy on task j after training on task i.
R = [
    [0.9, 0.2, 0.1],
    [0.7, 0.8, 0.3],
    [0.6, 0.5, 0.9],
]


def test_values_by_hand():
    assert average_accuracy(R) == pytest.approx((0.6 + 0.5 + 0.9) / 3)
    assert average_accuracy(R, after=1) == pytest.approx((0.7 + 0.8) / 2)
    assert backward_transfer(R) == pytest.approx(((0.6 - 0.9) + (0.5 - 0.8)) / 2)
    assert forward_transfer(R, baseline=[0.1, 0.1, 0.1]) == pytest.approx(
        ((0.2 - 0.1) + (0.3 - 0.1)) / 2
    )
    assert forgetting(R) == pytest.approx(((0.9 - 0.6) + (0.8 - 0.5)) / 2)
    assert retention(R) == pytest.approx((0.6 / 0.9 + 0.5 / 0.8) / 2)


def test_forgetting_uses_the_best_accuracy_after_learning_not_before():
    # Task 0 peaks after task 1 (0.95), task 1 is at 0.99 *before* it is learnt: not counted.
    r = np.array([[0.9, 0.99, 0.0], [0.95, 0.8, 0.0], [0.5, 0.6, 0.9]])
    assert forgetting(r) == pytest.approx(((0.95 - 0.5) + (0.8 - 0.6)) / 2)
    assert backward_transfer(r) == pytest.approx(((0.5 - 0.9) + (0.6 - 0.8)) / 2)


def test_no_forgetting_and_single_task():
    eye = np.eye(3) * 0.0 + np.tril(np.full((3, 3), 0.8))
    assert backward_transfer(eye) == 0.0 and forgetting(eye) == 0.0 and retention(eye) == 1.0
    one = [[0.7]]
    assert summary(one) == {"acc": 0.7, "bwt": 0.0, "forgetting": 0.0, "retention": 1.0}


def test_summary_and_shape_errors():
    s = summary(R, baseline=[0.1, 0.1, 0.1])
    assert set(s) == {"acc", "bwt", "fwt", "forgetting", "retention"}
    with pytest.raises(ValueError, match="T×T"):
        average_accuracy([[0.1, 0.2]])
    with pytest.raises(ValueError, match="one accuracy per task"):
        forward_transfer(R, baseline=[0.1])
