"""Continual-learning metrics from an accuracy matrix.

``R[i][j]`` is the accuracy on task j after training on tasks 0..i (a T×T list of lists or array).
Only the lower triangle (j ≤ i) is read, except by ``forward_transfer`` (the entries R[j−1][j]).

    average_accuracy   ACC = 1/T · Σ_j R[T−1][j]                              (after the last task)
    backward_transfer  BWT = 1/(T−1) · Σ_{j<T−1} (R[T−1][j] − R[j][j])
    forward_transfer   FWT = 1/(T−1) · Σ_{j≥1} (R[j−1][j] − b_j)    b_j: the initial model on task j
    forgetting         FGT = 1/(T−1) · Σ_{j<T−1} (max_{j≤i<T−1} R[i][j] − R[T−1][j])
    retention          RET = 1/(T−1) · Σ_{j<T−1} R[T−1][j] / R[j][j]

ACC, BWT and FWT as in Lopez-Paz & Ranzato, "Gradient Episodic Memory for Continual Learning"
(NeurIPS 2017); forgetting as in Chaudhry et al., "Riemannian Walk for Incremental Learning"
(ECCV 2018), with the maximum taken from the row where task j was learnt. A negative BWT is
forgetting; retention is the share of each task's just-learnt accuracy still there at the end.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Matrix = Sequence[Sequence[float]] | np.ndarray


def _square(R: Matrix) -> np.ndarray:
    a = np.asarray(R, dtype=float)
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] == 0:
        raise ValueError(f"an accuracy matrix is T×T with T ≥ 1, got shape {a.shape}")
    return a


def average_accuracy(R: Matrix, after: int | None = None) -> float:
    """Mean accuracy over the tasks seen so far, after task ``after`` (default: the last)."""
    a = _square(R)
    i = a.shape[0] - 1 if after is None else after
    return float(a[i, : i + 1].mean())


def backward_transfer(R: Matrix) -> float:
    """Mean change of each earlier task's accuracy from just after learning it to the end."""
    a = _square(R)
    t = a.shape[0]
    if t < 2:
        return 0.0
    return float(np.mean([a[t - 1, j] - a[j, j] for j in range(t - 1)]))


def forward_transfer(R: Matrix, baseline: Sequence[float]) -> float:
    """Mean accuracy on each task just before learning it, minus the initial model's."""
    a = _square(R)
    t = a.shape[0]
    if len(baseline) != t:
        raise ValueError(f"baseline needs one accuracy per task ({t}), got {len(baseline)}")
    if t < 2:
        return 0.0
    return float(np.mean([a[j - 1, j] - baseline[j] for j in range(1, t)]))


def forgetting(R: Matrix) -> float:
    """Mean drop of each earlier task from its best accuracy to its final accuracy."""
    a = _square(R)
    t = a.shape[0]
    if t < 2:
        return 0.0
    return float(np.mean([a[j : t - 1, j].max() - a[t - 1, j] for j in range(t - 1)]))


def retention(R: Matrix) -> float:
    """Mean ratio of each earlier task's final accuracy to its accuracy just after learning it."""
    a = _square(R)
    t = a.shape[0]
    if t < 2:
        return 1.0
    return float(np.mean([a[t - 1, j] / a[j, j] if a[j, j] else 0.0 for j in range(t - 1)]))


def summary(R: Matrix, baseline: Sequence[float] | None = None) -> dict[str, float]:
    """Every metric above in one dict (``fwt`` only with a baseline)."""
    out = {
        "acc": average_accuracy(R),
        "bwt": backward_transfer(R),
        "forgetting": forgetting(R),
        "retention": retention(R),
    }
    if baseline is not None:
        out["fwt"] = forward_transfer(R, baseline)
    return out
