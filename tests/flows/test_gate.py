from flows.config import GateConfig, UncertainPolicy
from flows.gate import gate
from flows.records import EvalReport, TaskRetention


def report(retention: dict[str, float], score: float, baseline: float = 0.1) -> EvalReport:
    return EvalReport(
        scores=retention,
        baseline={t: 1.0 for t in retention},
        retention=retention,
        new_task="rel",
        new_task_score=score,
        new_task_baseline=baseline,
        eval_seconds=0.0,
    )


def test_passes_only_when_every_check_holds():
    cfg = GateConfig(min_retention=0.9, min_new_task_score=0.5)
    assert gate(report({"gk": 0.95, "old": 0.91}, 0.6), cfg).passed


def test_one_forgotten_task_fails_the_gate_even_with_a_great_new_task():
    decision = gate(report({"gk": 0.95, "old": 0.5}, 0.99), GateConfig(min_retention=0.9))
    assert not decision.passed
    assert decision.reasons == ["retention[old] = 0.500 < 0.900: FAILED"]


def test_new_task_target_must_be_met_even_with_perfect_retention():
    decision = gate(report({"gk": 1.0}, 0.3), GateConfig(min_new_task_score=0.5))
    assert not decision.passed and "new_task_score[rel]" in decision.reasons[0]


def test_per_task_threshold_overrides_the_default():
    cfg = GateConfig(min_retention=0.9, min_retention_per_task={"gk": 0.99}, min_new_task_score=0)
    assert not gate(report({"gk": 0.95}, 0.6), cfg).passed
    assert gate(report({"gk": 0.995}, 0.6), cfg).passed


def test_threshold_for_a_task_without_probes_fails_rather_than_never_applying():
    cfg = GateConfig(min_retention_per_task={"typo-task": 0.9}, min_new_task_score=0)
    decision = gate(report({"gk": 1.0}, 0.6), cfg)
    assert not decision.passed and "typo-task" in decision.reasons[0]


def test_candidate_must_beat_the_champion_on_the_new_task_when_configured():
    cfg = GateConfig(min_retention=0.9, min_new_task_score=0.5, beat_champion=True)
    assert not gate(report({"gk": 1.0}, 0.6, baseline=0.6), cfg).passed
    relaxed = GateConfig(min_retention=0.9, min_new_task_score=0.5, beat_champion=False)
    assert gate(report({"gk": 1.0}, 0.6, baseline=0.6), relaxed).passed


def test_gain_threshold():
    cfg = GateConfig(min_new_task_score=0.0, min_new_task_gain=0.2)
    assert not gate(report({"gk": 1.0}, 0.25, baseline=0.1), cfg).passed
    assert gate(report({"gk": 1.0}, 0.35, baseline=0.1), cfg).passed


def with_intervals(
    retention: float,
    interval: tuple[float, float],
    score: float = 0.6,
    score_interval: tuple[float, float] = (0.55, 0.65),
    known: int = 40,
) -> EvalReport:
    stats = TaskRetention(
        n=80,
        known=known,
        lost=0,
        gained=0,
        champion_score=0.5,
        candidate_score=0.5 * retention,
        retention=retention,
        retention_low=interval[0],
        retention_high=interval[1],
        known_retained=1.0,
        known_retained_low=0.9,
        known_retained_high=1.0,
        too_small=known < 30,
    )
    return report({"gk": retention}, score).model_copy(
        update={
            "confidence": 0.9,
            "tasks": {"gk": stats},
            "new_task_interval": score_interval,
            "new_task_gain_interval": (score_interval[0] - 0.1, score_interval[1] - 0.1),
        }
    )


def test_a_retention_interval_that_straddles_the_threshold_blocks_by_default():
    cfg = GateConfig(min_retention=0.9, min_new_task_score=0.5)
    decision = gate(with_intervals(0.95, (0.85, 1.0)), cfg)
    assert not decision.passed
    (reason,) = decision.reasons
    assert reason.startswith("retention[gk] = 0.950 [0.850, 1.000] >= 0.900: FAILED")
    assert "straddles" in reason
    # The same point estimate with an interval above the threshold passes.
    assert gate(with_intervals(0.95, (0.91, 1.0)), cfg).passed
    # A whole interval below the threshold fails whatever the policy.
    lenient = cfg.model_copy(update={"when_uncertain": UncertainPolicy(retention="point_estimate")})
    assert not gate(with_intervals(0.8, (0.7, 0.88)), lenient).passed


def test_point_estimate_policy_decides_a_straddling_interval_on_the_value_and_says_so():
    lenient = GateConfig(
        min_retention=0.9, when_uncertain=UncertainPolicy(retention="point_estimate")
    )
    passed = gate(with_intervals(0.95, (0.85, 1.0)), lenient)
    assert passed.passed
    assert "decided on the point estimate" in passed.checks[0].note
    assert not gate(with_intervals(0.88, (0.8, 0.95)), lenient).passed


def test_new_task_target_is_decided_on_the_point_estimate_by_default():
    cfg = GateConfig(min_new_task_score=0.5, beat_champion=False)
    ok = gate(with_intervals(1.0, (1.0, 1.0), score=0.633, score_interval=(0.467, 0.779)), cfg)
    assert ok.passed
    assert "straddles" in ok.checks[1].note
    strict = cfg.model_copy(update={"when_uncertain": UncertainPolicy(new_task="fail")})
    blocked = gate(
        with_intervals(1.0, (1.0, 1.0), score=0.633, score_interval=(0.467, 0.779)), strict
    )
    assert not blocked.passed and blocked.checks[1].name == "new_task_score[rel]"


def test_a_task_with_too_few_known_items_is_reported_as_too_small_to_decide():
    cfg = GateConfig(min_retention=0.9, min_new_task_score=0.5)
    decision = gate(with_intervals(1.0, (0.8, 1.1), known=9), cfg)
    assert not decision.passed
    assert "too small to decide: the champion knows 9 of 80 items" in decision.reasons[0]
    # Lost nothing, gained nothing: the interval is a point and the task passes, still flagged.
    kept = gate(with_intervals(1.0, (1.0, 1.0), known=9), cfg)
    assert kept.passed and "too small" in kept.checks[0].note
