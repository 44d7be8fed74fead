"""Drift over five releases: each release loses a little of what the base model knew. Every step
passes against its champion; the check against the anchor (the base model, for general
knowledge) fails at the release where the cumulative loss crosses its threshold.

Twice: on per-item results made to lose exactly ``LOSS`` of 200 items a release, and on a tiny
model that knows 64 capitals and forgets one more with each release. Both go through the
evaluate step's own pairing and tests (``evaluate.retention_by_task``) and the gate."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flows.core.config import GateConfig, Params
from flows.core.data import probe_example
from flows.core.records import EvalReport
from flows.registry.serving import load
from flows.scoring import confidence
from flows.scoring.scoring import score_examples
from flows.steps.evaluate import EvaluateStep, retention_by_task
from flows.steps.gate import gate
from tests.flows.pretrained_tiny import old_task_items, pretrain_tiny_llm

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
    tasks = retention_by_task(
        EvaluateStep.from_params(params), rows(champion), rows(candidate), "champion"
    )
    anchored = retention_by_task(
        EvaluateStep.from_params(params), rows(base, "base"), rows(candidate), None
    )
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


@pytest.fixture(scope="module")
def knows_capitals(tmp_path_factory) -> Path:
    """A tiny Llama trained until it answers all 64 capitals (``tests/flows/pretrained_tiny.py``)."""
    return pretrain_tiny_llm(tmp_path_factory.mktemp("knows-capitals"))


def test_a_tiny_model_that_forgets_one_capital_per_release(knows_capitals):
    """Each release's model is the base with a little more of one fixed random direction added
    to its weights: the smallest step on a fine grid at which it answers one more capital wrong
    than the release before (found by bisection). Scored by the pipeline's own scoring and gated
    by its own tests, each step passes against its champion; the check against the base fails
    once the capitals lost add up past ``gate.min_retention_vs_anchor``."""
    params = Params(probes={"min_known": 30}, gate=GateConfig())
    model, tokenizer = load(knows_capitals, device="cpu")
    items = [probe_example(r) for r in old_task_items()]
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    draw = torch.Generator().manual_seed(0)
    direction = {
        k: torch.randn(v.shape, generator=draw) * v.float().std()
        for k, v in weights.items()
        if v.dim() >= 2
    }

    def answers(scale: float) -> list[dict]:
        model.load_state_dict({k: w + scale * direction[k] if k in direction else w
                               for k, w in weights.items()})  # fmt: skip
        return score_examples(model, tokenizer, items, False, 8, 64)

    def lost(before: list[dict], after: list[dict]) -> int:
        return sum(a["correct"] and not b["correct"] for a, b in zip(before, after, strict=True))

    base = answers(0.0)
    assert sum(r["correct"] for r in base) == len(items) == 64  # it knows every capital
    anchor_rows = [r | {"anchor": "base"} for r in base]
    champion, scale, failed_at, steps = base, 0.0, None, []
    for release in range(1, 6):
        low, high = scale, scale
        while lost(champion, answers(high)) == 0:  # past the next capital lost
            low, high = high, high + 0.001
        for _ in range(20):  # then the smallest such step
            mid = (low + high) / 2
            low, high = (mid, high) if lost(champion, answers(mid)) == 0 else (low, mid)
        scale, candidate = high, answers(high)
        steps.append(lost(champion, candidate))
        report = EvalReport(
            scores={}, baseline={}, retention={"capitals": 1.0}, new_task="r", new_task_score=1.0,
            new_task_baseline=0.0, eval_seconds=0, alpha=0.05,
            tasks=retention_by_task(EvaluateStep.from_params(params), champion, candidate, "champion"),
            anchored=retention_by_task(EvaluateStep.from_params(params), anchor_rows, candidate, None),
        )  # fmt: skip
        checks = {c.name: c for c in gate(report, params.gate).checks}
        assert checks["retention[capitals]"].passed, (release, str(checks["retention[capitals]"]))
        anchored = checks["retention_vs_anchor[capitals]"]
        kept = report.anchored["capitals"]
        assert kept.lost == sum(steps)  # the drift is every step's loss added up
        assert anchored.passed == (kept.low >= params.gate.min_retention_vs_anchor)
        if not anchored.passed:
            failed_at = release
            break
        champion = candidate  # promoted: the next release starts from it
    print(f"capitals lost per release {steps}; the anchor stopped release {failed_at}")
    assert failed_at is not None and failed_at >= 2, steps  # small steps, then the anchor stops it
