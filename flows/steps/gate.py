"""Step 6, gate: pass only when every retention threshold AND every new-task target holds.

Checks, each recorded with its value, its bounds and its threshold:
- ``retention[<task>]``: against the champion (no step back), for every probe task, at
  ``gate.min_retention`` (or the task's own threshold);
- ``retention_vs_anchor[<task>]``: against the task's anchor (the base model for general
  knowledge, the version that learned a release for its items), at
  ``gate.min_retention_vs_anchor``, so that small steps cannot add up to a large drift;
- ``new_task_score >= min_new_task_score``;
- ``new_task_score - new_task_baseline >= min_new_task_gain``;
- with ``beat_champion``: ``new_task_score > new_task_baseline`` (the champion's score).

A retention check passes only when its exact one-sided lower bound at ``1 − gate.alpha``
(``flows/scoring/confidence.py``) reaches the threshold: a candidate whose true retention is at the
threshold passes at most ``alpha`` of the time, whatever the number of items. A task with fewer
known items than the design needs (``too_small``) blocks by default (``gate.too_small: fail``);
``decide`` runs its test anyway, and the check names the policy. An earlier release's held-out
items are all there is of that task (no source can add more), so their policy is its own,
``gate.too_small_releases`` (``decide`` by default): the test still passes a candidate at the
threshold at most ``alpha`` of the time; only its power is lower, and the report gives the
retention that passes reliably with the items at hand. A report without per-item
results to test fails: nothing is promoted on an untested number.

The new-task targets are goals for new behaviour: decided on the point estimate by default
(``gate.when_uncertain.new_task``), their exact intervals recorded for a reviewer.
A failed gate is a normal outcome, returned as data.
"""

from __future__ import annotations

from flows.core.config import GateConfig
from flows.core.records import EvalReport, GateCheck, GateDecision, TaskRetention

STRADDLES = "interval straddles the threshold"


def check(
    name: str,
    value: float,
    threshold: float,
    interval: tuple[float, float] | None,
    policy: str,
    strict: bool = False,
    note: str = "",
) -> GateCheck:
    """A new-task check decided by its interval, or by its value where the interval straddles
    the threshold and ``policy`` is ``point_estimate`` (or where there is no interval)."""

    def clears(x: float) -> bool:
        return x > threshold if strict else x >= threshold

    passed = clears(value)
    notes = [note] if note else []
    if interval is not None:
        low, high = interval
        if clears(low):
            passed = True
        elif not clears(high):
            passed = False
        elif policy == "fail":
            passed = False
            notes.append(STRADDLES)
        else:
            notes.append(f"{STRADDLES}; decided on the point estimate")
    return GateCheck(
        name=name,
        value=value,
        threshold=threshold,
        passed=passed,
        interval=interval,
        note="; ".join(notes),
        strict=strict,
    )


def retention_check(name: str, stats: TaskRetention, too_small: tuple[str, str]) -> GateCheck:
    """Passed iff the one-sided lower bound reaches the threshold (and, under the ``fail``
    policy, the task has the known items its design needs); ``too_small`` is the policy's key
    in ``gate`` and its value."""
    key, too_small = too_small
    passed = stats.low >= stats.threshold
    notes = [
        f"vs {stats.against}: kept {stats.known - stats.lost} of {stats.known} known, "
        f"lost {stats.lost}, gained {stats.gained}; {stats.method}"
    ]
    if stats.too_small:
        small = (
            f"too small to decide: {stats.known} known items of {stats.n}, the design needs "
            f"{stats.needed_known}"
        )
        if too_small == "fail":
            passed = False
            notes.append(f"{small} (gate.{key}: fail)")
        else:
            notes.append(f"{small}; decided by its test (gate.{key}: decide)")
    return GateCheck(
        name=name,
        value=stats.value,
        threshold=stats.threshold,
        passed=passed,
        interval=(stats.low, stats.high),
        note="; ".join(notes),
        on_lower_bound=True,
    )


def gate(report: EvalReport, cfg: GateConfig) -> GateDecision:
    checks = []
    unknown = set(cfg.min_retention_per_task) - set(report.retention)
    if unknown:
        # A threshold for a task the probe set does not hold would silently never apply.
        checks += [
            GateCheck(name=f"probe task {t!r} present", value=0, threshold=1, passed=False)
            for t in sorted(unknown)
        ]
    for task in sorted(report.retention):
        stats = report.tasks.get(task)
        if stats is None:
            checks.append(
                GateCheck(
                    name=f"retention[{task}]",
                    value=report.retention[task],
                    threshold=cfg.threshold(task),
                    passed=False,
                    note="no per-item results to test: not decided on a point estimate",
                )
            )
            continue
        anchored = report.anchored.get(task)
        # an earlier release's items: anchored to the version that learned it, not the base
        key = "too_small_releases" if anchored and anchored.against != "base" else "too_small"
        policy = (key, getattr(cfg, key))
        checks.append(retention_check(f"retention[{task}]", stats, policy))
        if anchored is not None:
            checks.append(retention_check(f"retention_vs_anchor[{task}]", anchored, policy))
    score, base = report.new_task_score, report.new_task_baseline
    gain_ci = report.new_task_gain_interval
    policy = cfg.when_uncertain.new_task
    checks.append(
        check(
            f"new_task_score[{report.new_task}]",
            score,
            cfg.min_new_task_score,
            report.new_task_interval,
            policy,
        )
    )
    checks.append(check("new_task_gain", score - base, cfg.min_new_task_gain, gain_ci, policy))
    if cfg.beat_champion:
        checks.append(
            check("new_task_score - champion's", score - base, 0.0, gain_ci, policy, True)
        )
    return GateDecision(passed=all(c.passed for c in checks), checks=checks)
