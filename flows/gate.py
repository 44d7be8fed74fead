"""Step 6, gate: pass only when every retention threshold AND every new-task target holds.

Checks, each recorded with its value and threshold:
- ``retention[<task>] >= min_retention`` (or the task's own threshold) for every probe task;
- ``new_task_score >= min_new_task_score``;
- ``new_task_score - new_task_baseline >= min_new_task_gain``;
- with ``beat_champion``: ``new_task_score > new_task_baseline`` (the champion's score).
A failed gate is a normal outcome, returned as data.
"""

from __future__ import annotations

from flows.config import GateConfig
from flows.records import EvalReport, GateCheck, GateDecision


def gate(report: EvalReport, cfg: GateConfig) -> GateDecision:
    checks = []
    unknown = set(cfg.min_retention_per_task) - set(report.retention)
    if unknown:
        # A threshold for a task the probe set does not hold would silently never apply.
        checks += [
            GateCheck(name=f"probe task {t!r} present", value=0, threshold=1, passed=False)
            for t in sorted(unknown)
        ]
    for task, value in sorted(report.retention.items()):
        threshold = cfg.min_retention_per_task.get(task, cfg.min_retention)
        checks.append(
            GateCheck(
                name=f"retention[{task}]",
                value=value,
                threshold=threshold,
                passed=value >= threshold,
            )
        )
    score, base = report.new_task_score, report.new_task_baseline
    checks.append(
        GateCheck(
            name=f"new_task_score[{report.new_task}]",
            value=score,
            threshold=cfg.min_new_task_score,
            passed=score >= cfg.min_new_task_score,
        )
    )
    checks.append(
        GateCheck(
            name="new_task_gain",
            value=score - base,
            threshold=cfg.min_new_task_gain,
            passed=score - base >= cfg.min_new_task_gain,
        )
    )
    if cfg.beat_champion:
        checks.append(
            GateCheck(
                name="new_task_score - champion's",
                value=score - base,
                threshold=0.0,
                passed=score > base,
            )
        )
    return GateDecision(passed=all(c.passed for c in checks), checks=checks)
