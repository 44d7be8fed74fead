"""Drift over five releases: each release loses a little of what the base model knew. Every step
passes against its champion; the check against the anchor (the base model, for general
knowledge) fails at the release where the cumulative loss crosses its threshold.

The models' answers are per-item results, as the probe and evaluate steps write them, so that
each release loses exactly ``LOSS`` items; they go through the evaluate step's own pairing and
tests (``evaluate.retention_by_task``) and the gate."""

from __future__ import annotations

from flows import confidence
from flows.config import GateConfig, Params
from flows.evaluate import retention_by_task
from flows.gate import gate
from flows.records import EvalReport

ITEMS = 240
KNOWN = 200  # of them the base model answers right
LOSS = 6  # known items each release forgets


def rows(correct: list[bool], anchor: str | None = None) -> list[dict]:
    out = [
        {"id": f"q{i:03d}", "task": "general-knowledge", "correct": c}
        for i, c in enumerate(correct)
    ]
    return [r | {"anchor": anchor} for r in out] if anchor else out


def report_after(params: Params, champion: list[bool], candidate: list[bool], base: list[bool]):
    tasks = retention_by_task(params, rows(champion), rows(candidate), "champion")
    anchored = retention_by_task(params, rows(base, "base"), rows(candidate), None)
    return EvalReport(
        scores={"general-knowledge": sum(candidate) / ITEMS},
        baseline={"general-knowledge": sum(champion) / ITEMS},
        retention={"general-knowledge": tasks["general-knowledge"].retention},
        new_task="release",
        new_task_score=0.9,
        new_task_baseline=0.1,
        eval_seconds=0,
        alpha=params.gate.alpha,
        tasks=tasks,
        anchored=anchored,
    )


def test_small_steps_pass_each_time_and_the_anchor_stops_the_drift():
    params = Params(probes={"min_known": 100}, gate=GateConfig())
    base = [i < KNOWN for i in range(ITEMS)]
    champion = list(base)
    failed_at, without_anchor = None, []
    for release in range(1, 6):
        candidate = list(champion)
        lost = [i for i, c in enumerate(champion) if c][:LOSS]
        for i in lost:
            candidate[i] = False
        decision = gate(report_after(params, champion, candidate, base), params.gate)
        by_name = {c.name: c for c in decision.checks}
        step = by_name["retention[general-knowledge]"]
        anchored = by_name["retention_vs_anchor[general-knowledge]"]
        assert step.passed, (release, str(step))  # a little each time: the step is fine
        without_anchor.append(all(c.passed for c in decision.checks if c is not anchored))
        kept_of_base = (KNOWN - LOSS * release) / KNOWN
        assert anchored.value == kept_of_base
        expected = confidence.lower_bound(KNOWN - LOSS * release, KNOWN, 0.05) >= 0.85
        assert anchored.passed == expected == decision.passed
        if not decision.passed:
            failed_at = release
            break
        champion = candidate  # promoted: the next release starts from it
    # 200 known: 0.97 (bound 0.948), 0.94 (0.911), 0.91 (0.874), 0.88 (0.837) of what base knew
    assert failed_at == 4
    assert all(without_anchor)  # gated on the champion alone, every release would have passed
