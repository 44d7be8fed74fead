"""The gate with the product's own thresholds (``gate:`` of the repository's params.yaml), end to
end: a tiny Llama that knows 64 world capitals is the champion, 32 of them are its probes, and a
release (order status, one-word answers) is learned twice in one workspace.

- ``naive`` LoRA with a high learning rate learns the release and forgets the capitals: the gate
  fails on retention of the probe task alone; the version is registered and tagged failed, and
  the champion alias stays absent.
- ``lwf+self_rehearsal`` (distillation from the champion on the new inputs, plus the champion's
  own answers to the 32 other capital questions) learns the same release with the same settings
  and keeps the capitals: the gate passes and the version becomes the champion.

Measured over 3 pre-training × 3 training seeds: naive retention 0.00-0.06, lwf+self_rehearsal
retention 1.00 with new-task scores 0.75-0.94, the champion 1.00 on the probes and 0.00 on the
release.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from flows.config import GateConfig, load_params
from flows.records import FILES, GateDecision, Promotion
from flows.retrain import RetrainSummary, retrain
from tests.conftest import write_params
from tests.flows.pretrained_tiny import (
    OLD_TASK,
    pretrain_tiny_llm,
    write_new_release,
    write_old_task,
)

pytestmark = pytest.mark.usefixtures("prefect_harness")

REPO = Path(__file__).resolve().parents[2]
PRODUCT_GATE: GateConfig = load_params(REPO / "params.yaml").gate
N_PROBES = 32
PROTECTING = "lwf+self_rehearsal"


@pytest.fixture(scope="module")
def old_task(tmp_path_factory) -> dict[str, Path]:
    """The champion that knows the capitals, its probe source, rehearsal prompts and the
    release it is retrained on."""
    root = tmp_path_factory.mktemp("gate-e2e")
    probes, rehearsal = write_old_task(root, n_probes=N_PROBES)
    return {
        "model": pretrain_tiny_llm(root / "champion"),
        "probes": probes,
        "rehearsal": rehearsal,
        "release": write_new_release(root / "releases"),
    }


def product_gate_params(tmp_path: Path, old_task: dict[str, Path]) -> Path:
    """params.yaml for the tiny champion, gated by the repository's own thresholds."""
    return write_params(
        tmp_path,
        old_task["model"],
        tmp_path / "demo",  # never built: the probes, rehearsal prompts and release are given
        probes={"sources": [str(old_task["probes"])], "per_category": 64},
        train={
            "strategy": "naive",
            "learning_rate": 0.005,  # the same for both strategies; only the strategy differs
            "max_steps": 40,
            "rehearsal_prompts": str(old_task["rehearsal"]),
            "strategy_params": {
                "self_rehearsal": {
                    "buffer_size": 64,
                    "ratio": 1.0,
                    "max_new_tokens": 8,
                    "generation_batch_size": 32,
                }
            },
        },
        evaluate={"batch_size": 32, "max_new_tokens": 8, "new_task_max_new_tokens": 4},
        gate=PRODUCT_GATE.model_dump(),
    )


def failed_checks(summary: RetrainSummary) -> list[str]:
    return [c.name for c in summary.gate.checks if not c.passed]


def test_the_product_gate_rejects_forgetting_and_promotes_a_strategy_that_prevents_it(
    tmp_path, old_task
):
    gate = PRODUCT_GATE
    assert gate.min_retention > 0 and gate.min_new_task_score > 0, "the product gate is off"
    threshold = gate.min_retention_per_task.get(OLD_TASK, gate.min_retention)
    params_file = product_gate_params(tmp_path, old_task)
    params = load_params(params_file)
    assert params.gate == gate
    name, ws = params.model.registered_name, params.workspace_dir
    client = MlflowClient(tracking_uri=params.tracking_uri, registry_uri=params.tracking_uri)
    release = str(old_task["release"])

    # (a) naive: the new task is learned, the capitals are forgotten, the gate says no.
    naive = retrain(params_file=str(params_file), release=release)
    assert naive.strategy == "naive" and naive.champion_at_start is None
    probe_items = [json.loads(line) for line in (ws / "probes" / "probe_set.jsonl").open()]
    assert sum(p["task"] == OLD_TASK for p in probe_items) == N_PROBES
    ev = naive.eval
    assert set(ev.baseline) == {OLD_TASK}
    assert ev.baseline[OLD_TASK] >= 0.9  # the champion knows its probes: retention means something
    assert ev.new_task_baseline < gate.min_new_task_score  # and does not know the release
    assert ev.new_task_score >= gate.min_new_task_score and ev.new_task_score > ev.new_task_baseline
    assert ev.retention[OLD_TASK] < threshold
    assert ev.retention[OLD_TASK] < 0.5  # not a near miss: most capitals are gone
    assert not naive.gate.passed
    assert failed_checks(naive) == [f"retention[{OLD_TASK}]"]
    assert len(naive.gate.reasons) == 1 and OLD_TASK in naive.gate.reasons[0]
    assert not naive.promotion.promoted and naive.promotion.champion_version is None

    v1 = client.get_model_version(name, naive.registration.version)
    assert str(v1.version) == "1" and v1.tags["gate"] == "failed"
    assert f"retention[{OLD_TASK}]" in v1.tags["gate_reasons"]
    assert v1.tags["promotion"] == "not promoted (gate failed)"
    assert client.get_registered_model(name).aliases == {}  # no champion: the base stands
    run = client.get_run(naive.registration.run_id)
    assert run.data.tags["gate"] == "failed" and run.data.params["train.strategy"] == "naive"
    assert run.data.metrics[f"retention.{OLD_TASK}"] == pytest.approx(ev.retention[OLD_TASK])
    assert not GateDecision.read(naive.run_dir / FILES["gate"]).passed
    assert not Promotion.read(naive.run_dir / FILES["promote"]).promoted
    assert not RetrainSummary.read(naive.run_dir / "summary.json").gate.passed
    matrix = json.loads((ws / "accuracy_matrix.json").read_text())
    assert [r["label"] for r in matrix["rows"]] == ["base", "v1"]
    base_row, v1_row = matrix["rows"]
    assert base_row["scores"][OLD_TASK] == ev.baseline[OLD_TASK]
    assert v1_row["scores"][OLD_TASK] == ev.scores[OLD_TASK] and v1_row["promoted"] is False

    # (b) the same release and settings with a forgetting-prevention strategy: passed, promoted.
    kept = retrain(
        params_file=str(params_file), release=release, overrides={"train.strategy": PROTECTING}
    )
    assert kept.strategy == PROTECTING and kept.champion_at_start is None
    ev2 = kept.eval
    assert ev2.baseline == ev.baseline  # the same champion, the same probes: the same yardstick
    assert ev2.retention[OLD_TASK] >= threshold
    assert ev2.new_task_score >= gate.min_new_task_score
    assert ev2.new_task_score > ev2.new_task_baseline
    assert kept.gate.passed, kept.gate.reasons
    assert kept.promotion.promoted and kept.promotion.champion_version == "2"
    champion = client.get_model_version_by_alias(name, "champion")
    assert str(champion.version) == "2" and champion.tags["gate"] == "passed"
    assert champion.tags["previous_champion"] == "base"
    assert client.get_model_version(name, "1").tags["gate"] == "failed"  # v1 stays rejected
    matrix = json.loads((ws / "accuracy_matrix.json").read_text())
    assert [(r["label"], r["promoted"]) for r in matrix["rows"][1:]] == [
        ("v1", False),
        ("v2", True),
    ]
    assert matrix["rows"][2]["scores"][OLD_TASK] == ev2.scores[OLD_TASK]
