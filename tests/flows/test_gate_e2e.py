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

from flows.core.config import GateConfig, load_params
from flows.core.records import FILES, GateDecision, Promotion
from flows.drivers.retrain import RetrainSummary, retrain
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
        # Without a tournament all 32 probes are test items; the champion knows all of them.
        probes={"sources": [str(old_task["probes"])], "per_category": 64, "min_known": 12},
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
    probe_items = [json.loads(line) for line in (ws / "probes" / "test.jsonl").open()]
    assert sum(p["task"] == OLD_TASK for p in probe_items) == N_PROBES
    assert not (ws / "probes" / "dev.jsonl").exists()  # nothing selects on dev: no split
    stats = naive.eval.tasks[OLD_TASK]
    assert stats.n == N_PROBES and not stats.too_small
    assert stats.high < threshold  # forgetting shown, not only estimated
    ev = naive.eval
    assert set(ev.baseline) == {OLD_TASK}
    assert ev.baseline[OLD_TASK] >= 0.9  # the champion knows its probes: retention means something
    assert ev.new_task_baseline < gate.min_new_task_score  # and does not know the release
    assert ev.new_task_score >= gate.min_new_task_score and ev.new_task_score > ev.new_task_baseline
    assert ev.retention[OLD_TASK] < threshold
    assert ev.retention[OLD_TASK] < 0.5  # not a near miss: most capitals are gone
    assert not naive.gate.passed
    # against the champion and against the anchor, here the same base model
    assert failed_checks(naive) == [f"retention[{OLD_TASK}]", f"retention_vs_anchor[{OLD_TASK}]"]
    assert all(OLD_TASK in reason for reason in naive.gate.reasons)
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
    assert ev2.tasks[OLD_TASK].low >= threshold  # retention shown by the exact test
    anchored = ev2.anchored[OLD_TASK]  # the first release: the anchor is the base, the champion
    assert anchored.against == "base" and anchored.low >= PRODUCT_GATE.min_retention_vs_anchor
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


def jsonl_keys(path: Path) -> set[tuple[str, str]]:
    return {(r["task"], r["id"]) for r in map(json.loads, path.open())}


def test_a_tournament_chooses_on_dev_and_only_the_winner_is_gated_on_test(tmp_path, old_task):
    """Two candidates with the same settings: naive forgets on the dev probes, the protecting
    strategy keeps them; the latter wins, is gated on the test probes and promoted. Nothing that
    chose it scored a test item."""
    params_file = product_gate_params(tmp_path, old_task)
    summary = retrain(
        params_file=str(params_file),
        release=str(old_task["release"]),
        overrides={
            "train.candidates": {"naive": {}, PROTECTING: {}},
            # 16 test probes: all kept shows 0.05^(1/16) = 0.829 at most, not 0.9
            "gate.min_retention": 0.8,
            "gate.min_retention_vs_anchor": 0.8,
        },
    )
    params = load_params(params_file)
    ws, run_dir = params.workspace_dir, summary.run_dir
    results = json.loads((run_dir / "tournament.json").read_text())
    by_label = {r["candidate"]["label"]: r for r in results}
    assert list(by_label) == ["naive", PROTECTING]
    assert not by_label["naive"]["eligible"] and by_label["naive"]["note"] == "forgets on dev"
    assert by_label["naive"]["dev"]["retention"][OLD_TASK] < PRODUCT_GATE.min_retention
    assert by_label[PROTECTING]["eligible"] and by_label[PROTECTING]["winner"]
    assert summary.strategy == PROTECTING
    assert summary.gate.passed and summary.promotion.promoted, summary.gate.reasons

    # Selection never read a test item: every item a candidate was scored on is dev.
    test_probes = jsonl_keys(ws / "probes" / "test.jsonl")
    dev_probes = jsonl_keys(ws / "probes" / "dev.jsonl")
    test_new_task = jsonl_keys(run_dir / "candidate" / "new_task.jsonl")
    scored_in_selection = [p for p in (run_dir / "candidates").rglob("*.jsonl")]
    assert len(scored_in_selection) == 4  # probes + new task, per candidate
    for path in scored_in_selection:
        keys = jsonl_keys(path)
        assert keys and not keys & test_probes and not keys & test_new_task, path
    assert jsonl_keys(run_dir / "candidate" / "probes.jsonl") == test_probes  # the gate: test
    assert all(
        jsonl_keys(run_dir / "candidates" / name / "dev" / "probes.jsonl") == dev_probes
        for name in ("naive", PROTECTING)
    )
    assert summary.eval.new_task_n == len(test_new_task) == 8  # the test half of 16

    # MLflow: the registered run is the winner's; each candidate is a child run.
    client = MlflowClient(tracking_uri=params.tracking_uri, registry_uri=params.tracking_uri)
    parent = client.get_run(summary.registration.run_id)
    assert parent.data.params["train.strategy"] == PROTECTING
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
    )
    winners = {r.info.run_name: r.data.tags["winner"] for r in children}
    assert winners == {"naive": "false", PROTECTING: "true"}
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert "report/tournament.png" in artifacts


def test_merge_coefficients_share_one_fine_tune_and_are_chosen_on_dev(tmp_path, old_task):
    """``{naive+wise: {wise.mix: [0.0, 0.5, 1.0]}}``: one fine-tune, the three merges made from
    it after training (θ⁰ + mix·(θ − θ⁰), exactly), each scored on dev; mix 0 is the champion."""
    from safetensors.torch import load_file

    from flows.registry.tracking import candidate_dir

    params_file = product_gate_params(tmp_path, old_task)
    summary = retrain(
        params_file=str(params_file),
        release=str(old_task["release"]),
        overrides={"train.candidates": {"naive+wise": {"wise.mix": [0.0, 0.5, 1.0]}}},
    )
    run_dir = summary.run_dir
    results = {
        r["candidate"]["label"]: r for r in json.loads((run_dir / "tournament.json").read_text())
    }
    labels = ["naive+wise wise.mix=0.0", "naive+wise wise.mix=0.5", "naive+wise wise.mix=1.0"]
    assert list(results) == labels
    trained = [r["trained"] for r in results.values()]
    assert [t["train_seconds"] > 0 for t in trained] == [True, False, False]  # counted once
    assert all(t["log_history"] == trained[0]["log_history"] for t in trained)  # one training
    assert trained[2]["model_dir"] == str(
        run_dir / "candidates" / "naive+wise_trained_once_for_wise.mix" / "candidate_model"
    )

    store = load_params(params_file).model_store

    def weights(folder) -> dict:  # the winner's folder gave way to its registered version's
        files = sorted(candidate_dir(store, Path(folder)).glob("*.safetensors"))
        return {k: v for f in files for k, v in load_file(f).items()}

    champion = weights(old_task["model"])
    tuned = weights(trained[2]["model_dir"])
    half, none = weights(trained[1]["model_dir"]), weights(trained[0]["model_dir"])
    changed = [k for k in tuned if not tuned[k].equal(champion[k])]
    assert changed  # training moved the weights
    for k in tuned:
        assert none[k].equal(champion[k])
        assert half[k].allclose(champion[k] + 0.5 * (tuned[k] - champion[k]), atol=1e-6)

    zero = results[labels[0]]["dev"]
    assert set(zero["retention"].values()) == {1.0}  # the champion itself keeps everything
    assert zero["new_task_score"] == zero["new_task_baseline"]
    assert not results[labels[0]]["eligible"]  # it does not beat the champion on the task
    assert sum(r["winner"] for r in results.values()) == 1
    if not any(r["eligible"] for r in results.values()):  # the least forgetting goes forward:
        assert results[labels[0]]["winner"]  # the champion's own weights, which the gate blocks
        assert not summary.gate.passed and not summary.promotion.promoted
