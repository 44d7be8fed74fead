"""Step 6, gate: pass only when every retention threshold AND every new-task target holds.

Checks, each recorded with its value, its confidence interval and its threshold:
- ``retention[<task>] >= min_retention`` (or the task's own threshold) for every probe task;
- ``new_task_score >= min_new_task_score``;
- ``new_task_score - new_task_baseline >= min_new_task_gain``;
- with ``beat_champion``: ``new_task_score > new_task_baseline`` (the champion's score).

A check whose whole interval clears its threshold passes; one whose whole interval misses it
fails. An interval that straddles the threshold is decided by ``gate.when_uncertain``:
- retention: ``fail`` by default. The gate promotes unattended, and the two errors cost unlike
  amounts: a false pass ships a model that forgot what production relies on, silently; a false
  block costs a retrain or an audited ``forgetless promote VERSION --force --reason``. So the
  candidate must show, at the configured confidence, that it kept what it should.
- new task: ``point_estimate`` by default. The target is a goal for new behaviour the champion
  does not have; missing it by noise harms nothing that already works, and the interval is
  still recorded for a reviewer.
A probe task with fewer known items than ``probes.min_known`` is flagged "too small to decide":
its interval is wide, so under the default it blocks unless the candidate lost nothing.
A failed gate is a normal outcome, returned as data.
"""

from __future__ import annotations

from flows.config import GateConfig
from flows.records import EvalReport, GateCheck, GateDecision

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
    """One check decided by its interval, or by its value where the interval straddles the
    threshold and ``policy`` is ``point_estimate`` (or where there is no interval)."""

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


def gate(report: EvalReport, cfg: GateConfig) -> GateDecision:
    checks = []
    unknown = set(cfg.min_retention_per_task) - set(report.retention)
    if unknown:
        # A threshold for a task the probe set does not hold would silently never apply.
        checks += [
            GateCheck(name=f"probe task {t!r} present", value=0, threshold=1, passed=False)
            for t in sorted(unknown)
        ]
    policy = cfg.when_uncertain
    for task, value in sorted(report.retention.items()):
        stats = report.tasks.get(task)
        interval = (stats.retention_low, stats.retention_high) if stats else None
        note = ""
        if stats and stats.too_small:
            note = f"too small to decide: the champion knows {stats.known} of {stats.n} items"
        checks.append(
            check(
                f"retention[{task}]",
                value,
                cfg.min_retention_per_task.get(task, cfg.min_retention),
                interval,
                policy.retention,
                note=note,
            )
        )
    score, base = report.new_task_score, report.new_task_baseline
    gain_ci = report.new_task_gain_interval
    checks.append(
        check(
            f"new_task_score[{report.new_task}]",
            score,
            cfg.min_new_task_score,
            report.new_task_interval,
            policy.new_task,
        )
    )
    checks.append(
        check("new_task_gain", score - base, cfg.min_new_task_gain, gain_ci, policy.new_task)
    )
    if cfg.beat_champion:
        checks.append(
            check("new_task_score - champion's", score - base, 0.0, gain_ci, policy.new_task, True)
        )
    return GateDecision(passed=all(c.passed for c in checks), checks=checks)
