"""The whole retrain on a tiny model with real Prefect, MLflow (SQLite), git + DVC and Great
Expectations: a pass moves the champion, a failed gate registers without moving it, and the
next release starts from the new champion with the old release among its probes."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from prefect.client.schemas.sorting import ArtifactSort

from flows.core.config import load_params
from flows.core.data import DataError
from flows.drivers.retrain import retrain
from flows.steps.validate import ValidationFailed
from tests.conftest import GENERAL_TASKS, write_params

pytestmark = pytest.mark.usefixtures("prefect_harness")


def mlflow_client(params_file):
    uri = load_params(params_file).tracking_uri
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def test_pass_then_fail_then_next_release(tmp_path, tiny_model_dir, demo_dir):
    params_file = write_params(tmp_path, tiny_model_dir, demo_dir)
    ws = tmp_path / "workspace"

    first = retrain(params_file=str(params_file))
    assert first.release == "wiki-topics-1" and first.champion_at_start is None
    assert first.gate.passed, first.gate.reasons
    assert first.eval.new_task_score > first.eval.new_task_baseline  # it learned something
    assert first.promotion.promoted and first.promotion.champion_version == "1"
    client = mlflow_client(params_file)
    v1 = client.get_model_version_by_alias("forgetless-lm", "champion")
    assert str(v1.version) == "1" and v1.tags["gate"] == "passed"
    assert json.loads(v1.tags["releases_learned"]) == ["wiki-topics-1"]

    # The MLflow run holds what a reviewer needs.
    run = client.get_run(first.registration.run_id)
    dvc_file = yaml.safe_load((ws / "releases" / "wiki-topics-1.dvc").read_text())
    assert run.data.tags["release_dvc_hash"] == dvc_file["outs"][0]["md5"]
    assert run.data.tags["gate"] == "passed"
    assert run.data.params["train.strategy"] == "naive"
    losses = client.get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in losses] == list(range(1, 41))
    contexts = {i.tags[0].value for i in run.inputs.dataset_inputs}
    assert contexts == {"probe-test", "eval", "training"}  # no tournament: no dev probes
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"gate_report.json", "eval_report.json", "plots", "report"} <= artifacts
    report_files = {a.path for a in client.list_artifacts(run.info.run_id, "report")}
    assert {
        "report/forgetting_report.html",
        "report/forgetting_report.md",
        "report/gate_checks.png",
        "report/accuracy_matrix.png",
    } <= report_files
    page = Path(
        mlflow.artifacts.download_artifacts(
            run_id=run.info.run_id,
            artifact_path="report/forgetting_report.html",
            tracking_uri=load_params(params_file).tracking_uri,
            dst_path=str(tmp_path / "downloaded"),
        )
    ).read_text()
    assert "gate PASSED; promoted: v1 is champion" in page
    assert dvc_file["outs"][0]["md5"] in page  # the lineage names the release's content hash
    stats = first.eval.tasks["general-knowledge"]
    assert f"{stats.known} known, {stats.lost} lost, {stats.gained} gained" in page
    flipped = first.eval.tasks.values()  # every lost and gained item, side by side
    assert page.count("<tr><td>lost</td>") == sum(s.lost for s in flipped)
    assert page.count("<tr><td>gained</td>") == sum(s.gained for s in flipped)
    with get_client(sync_client=True) as prefect:  # the same report, as markdown, in Prefect
        (artifact,) = prefect.read_artifacts(  # the newest: this retrain's
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["forgetting-report"])),
            sort=ArtifactSort.CREATED_DESC,
            limit=1,
        )
    assert artifact.type == "markdown" and "**Gate PASSED**" in artifact.data
    assert f"{stats.known} known" in artifact.data

    # The release is in the workspace's git history and in the DVC remote.
    log = subprocess.run(
        ["git", "-C", str(ws), "log", "--format=%s"], capture_output=True, text=True
    )
    assert "Release wiki-topics-1" in log.stdout
    assert any((tmp_path / "dvc-remote").rglob("*")), "dvc push left the remote empty"

    # The champion loads by alias and answers.
    model = mlflow.pyfunc.load_model("models:/forgetless-lm@champion")
    answers = model.predict(["Which topic is this article about? Answer with one of: Arts."])
    assert isinstance(answers, list) and len(answers) == 1 and isinstance(answers[0], str)

    # A threshold out of reach: registered, tagged failed, the champion stays v1.
    failed = retrain(
        params_file=str(params_file), overrides={"gate.min_new_task_score": 1.0}
    )  # out of reach
    assert failed.release == "wiki-topics-2" and failed.champion_at_start == "1"
    assert not failed.gate.passed
    assert any("new_task_score" in r for r in failed.gate.reasons)
    assert not failed.promotion.promoted
    v2 = client.get_model_version("forgetless-lm", failed.registration.version)
    assert v2.tags["gate"] == "failed" and "new_task_score" in v2.tags["gate_reasons"]
    assert json.loads(v2.tags["learned_by"]) == {"wiki-topics-1": "1"}  # the anchor of its items
    assert str(client.get_model_version_by_alias("forgetless-lm", "champion").version) == "1"

    # The next retrain starts from champion v1; release 1's held-out items are probes now.
    second = retrain(params_file=str(params_file))
    assert second.champion_at_start == "1" and second.release == "wiki-topics-2"
    assert set(second.eval.baseline) == {*GENERAL_TASKS, "wiki-topics-1"}
    assert second.eval.baseline["wiki-topics-1"] == pytest.approx(
        first.eval.new_task_score, abs=0.2
    )
    test_items = [json.loads(line) for line in (ws / "probes" / "test.jsonl").open()]
    assert {r["task"] for r in test_items} == {*GENERAL_TASKS, "wiki-topics-1"}
    # Each task is also gated against its anchor: the base model for general knowledge, v1 (the
    # version that learned it) for release 1's items, on the same items.
    anchored = second.eval.anchored
    assert {t: a.against for t, a in anchored.items()} == {
        **dict.fromkeys(GENERAL_TASKS, "base"),
        "wiki-topics-1": "v1",
    }
    for task, a in anchored.items():
        assert a.n == second.eval.tasks[task].n
        assert any(c.name == f"retention_vs_anchor[{task}]" for c in second.gate.checks)

    matrix = json.loads((ws / "accuracy_matrix.json").read_text())
    labels = [r["label"] for r in matrix["rows"]]
    assert labels == ["base", "v1", "v2", "v3"]
    assert matrix["rows"][1]["scores"]["wiki-topics-1"] == first.eval.new_task_score
    assert (second.run_dir / "accuracy_matrix.png").stat().st_size > 1000

    # Other content under a learned release's name: refused before the workspace copy, which the
    # probes read, is touched.
    learned = ws / "releases" / "wiki-topics-1"
    before = {f.name: f.read_bytes() for f in learned.iterdir()}
    impostor = tmp_path / "elsewhere" / "wiki-topics-1"
    shutil.copytree(demo_dir / "releases" / "wiki-topics-2", impostor)
    with pytest.raises(DataError, match="already learned a release named 'wiki-topics-1'"):
        retrain(params_file=str(params_file), release=str(impostor))
    assert {f.name: f.read_bytes() for f in learned.iterdir()} == before
    assert len(client.search_model_versions("name='forgetless-lm'")) == 3


def test_malformed_release_is_rejected_before_training(tmp_path, tiny_model_dir, demo_dir):
    params_file = write_params(tmp_path, tiny_model_dir, demo_dir)
    release = tmp_path / "my-release"
    shutil.copytree(demo_dir / "releases" / "wiki-topics-1", release)
    lines = (release / "train.jsonl").read_text().splitlines()
    lines[6] = json.dumps({"id": "broken", "prompt": "Which topic?"})  # no completion
    (release / "train.jsonl").write_text("\n".join(lines) + "\n")

    with pytest.raises(ValidationFailed) as err:
        retrain(params_file=str(params_file), release=str(release))
    message = str(err.value)
    assert "train.jsonl:7" in message and "'broken'" in message
    assert "a completion (or final assistant message) is required" in message
    client = mlflow_client(params_file)
    assert client.search_model_versions("name='forgetless-lm'") == []
    runs = list((tmp_path / "workspace" / "runs").iterdir())
    assert not any((r / "trainer").exists() for r in runs), "training started on bad data"
    report = json.loads((runs[0] / "validation_report.json").read_text())
    assert report["passed"] is False and report["violations"][0]["line"] == 7


def test_probe_prompt_in_training_data_is_rejected(tmp_path, tiny_model_dir, demo_dir):
    params_file = write_params(tmp_path, tiny_model_dir, demo_dir)
    release = tmp_path / "leaky"
    shutil.copytree(demo_dir / "releases" / "wiki-topics-1", release)
    probe = json.loads((demo_dir / "probes" / "general_knowledge.jsonl").open().readline())
    with open(release / "train.jsonl", "a") as f:
        f.write(json.dumps({"id": "leak", "prompt": probe["prompt"], "completion": "x"}) + "\n")
    with pytest.raises(ValidationFailed, match="probe leaked into the release"):
        retrain(params_file=str(params_file), release=str(release))
    assert mlflow_client(params_file).search_model_versions("name='forgetless-lm'") == []


def test_a_symlink_out_of_the_release_is_refused_before_it_is_copied(
    tmp_path, tiny_model_dir, demo_dir
):
    params_file = write_params(tmp_path, tiny_model_dir, demo_dir)
    secret = tmp_path / "outside.jsonl"
    secret.write_text(json.dumps({"id": "s", "prompt": "private", "completion": "data"}) + "\n")
    release = tmp_path / "linked"
    shutil.copytree(demo_dir / "releases" / "wiki-topics-1", release)
    (release / "train.jsonl").unlink()
    (release / "train.jsonl").symlink_to(secret)
    with pytest.raises(DataError, match="symbolic link points outside the release folder"):
        retrain(params_file=str(params_file), release=str(release))
    assert not (tmp_path / "workspace" / "releases" / "linked").exists()
    assert mlflow_client(params_file).search_model_versions("name='forgetless-lm'") == []
