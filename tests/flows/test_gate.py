from flows.config import GateConfig
from flows.gate import gate
from flows.records import EvalReport


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
