"""Services that fail, for real: a tracking server stopped in the middle of a retrain, a DVC remote
that cannot be written, a Prefect API that does not answer.

Each fault is retried and then fails with a message naming the service, where it is and what to
do; the records of the finished steps stay; ``forgetless resume RUN_DIR`` finishes the run once
the service is back, registering the candidate exactly once and promoting it only on a gate pass
from the champion it was measured against.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient
from prefect.settings import PREFECT_API_URL, temporary_settings

import flows.steps.register
from flows.cli.main import main
from flows.core.config import load_params, run_params, save_params
from flows.core.records import (
    FILES,
    STAGES,
    EvalReport,
    GateDecision,
    ProbeSet,
    Promotion,
    Registration,
    TrainResult,
    VersionedRelease,
)
from flows.core.workspace import git
from flows.drivers.retrain import PrefectUnavailable, retrain
from flows.drivers.stages import run_stage
from flows.registry.tracking import TrackingUnavailable, champion_version
from flows.steps.register import IDEMPOTENCY_TAG, RegisterStep, register
from flows.steps.version import RemoteUnavailable
from tests.conftest import count, write_params
from tests.flows.conftest import gated_run
from tests.flows.mlflow_server import MlflowServer, free_port

NAME = "forgetless-lm"
RELEASE = "wiki-topics-1"


@pytest.fixture
def server(tmp_path):
    s = MlflowServer(tmp_path / "mlflow-server")
    s.start()
    yield s
    s.stop()


def server_params(tmp_path: Path, tiny_model_dir: Path, demo_dir: Path, url: str) -> Path:
    return write_params(tmp_path, tiny_model_dir, demo_dir, tracking={"uri": url})


def versions(url: str) -> list:
    return list(MlflowClient(url, url).search_model_versions(f"name = '{NAME}'"))


def champion(url: str) -> str | None:
    c = MlflowClient(url, url)
    try:
        return str(c.get_model_version_by_alias(NAME, "champion").version)
    except mlflow.exceptions.MlflowException:
        return None


def records(run_dir: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(run_dir.glob("*.json"))}


def resume_cli(params_file: Path, run_dir: Path, capsys) -> tuple[int, str]:
    code = main(["--params", str(params_file), "resume", str(run_dir)])
    return code, " ".join(capsys.readouterr().out.split())


def test_tracking_outage_before_register_then_resume(
    tmp_path, tiny_model_dir, demo_dir, server, capsys
):
    params_file = server_params(tmp_path, tiny_model_dir, demo_dir, server.url)
    params = load_params(params_file)
    run_dir = params.workspace_dir / "runs" / "outage"
    for stage in STAGES[: STAGES.index("register")]:
        run_stage(stage, params, run_dir, demo_dir / "releases" / RELEASE)
    done = records(run_dir)
    assert set(done) >= {FILES[s] for s in STAGES[:6]}

    server.stop()
    count("service fault", "mlflow server stopped before register")
    start = time.perf_counter()
    with pytest.raises(TrackingUnavailable) as err:
        run_stage("register", params, run_dir)
    message = str(err.value)
    assert f"MLflow tracking server {server.url} is unreachable" in message
    assert "4 attempts" in message and time.perf_counter() - start >= 14  # retried, backing off
    assert "start the server or fix tracking.uri" in message
    assert "forgetless resume RUN_DIR" in message
    assert records(run_dir) == done  # the finished steps' records are intact, none added
    count("service fault", "resume while the mlflow server is down")
    code, out = resume_cli(params_file, run_dir, capsys)  # still down: a clear refusal
    assert code == 2 and server.url in out and "is unreachable" in out
    assert records(run_dir) == done

    server.start()  # the same store on the same port
    assert versions(server.url) == [] and champion(server.url) is None  # nothing was registered
    code, out = resume_cli(params_file, run_dir, capsys)
    assert code == 0 and "ran register, promote" in out
    (mv,) = versions(server.url)
    gate = GateDecision.read(run_dir / FILES["gate"])
    assert gate.passed, gate.reasons  # the tiny model learns the release (as in test_retrain)
    assert Registration.read(run_dir / FILES["register"]).version == str(mv.version) == "1"
    assert mv.tags["gate"] == "passed" and mv.tags["release"] == RELEASE
    run = MlflowClient(server.url, server.url).get_run(mv.run_id)
    assert run.data.tags[IDEMPOTENCY_TAG] == mv.tags[IDEMPOTENCY_TAG]
    # The champion was the base when the run measured it and still is: the pass promotes.
    assert Promotion.read(run_dir / FILES["promote"]).promoted
    assert champion(server.url) == "1" and f"Model {NAME} v1 is now champion" in out
    assert mv.tags["promotion"].startswith("promoted") and mv.tags["previous_champion"] == "base"
    # The resumed run is published as the flow publishes one: report and accuracy matrix.
    client = MlflowClient(server.url, server.url)
    report = {a.path for a in client.list_artifacts(mv.run_id, "report")}
    assert {"report/forgetting_report.html", "report/accuracy_matrix.png"} <= report
    assert "promoted: v1 is champion" in (run_dir / "forgetting_report.html").read_text()
    matrix = json.loads((params.workspace_dir / "accuracy_matrix.json").read_text())
    assert [(r["label"], r.get("promoted")) for r in matrix["rows"]] == [
        ("base", None),
        ("v1", True),
    ]

    after = records(run_dir)
    code, out = resume_cli(params_file, run_dir, capsys)  # a second resume changes nothing
    assert code == 0 and "nothing to resume" in out
    assert len(versions(server.url)) == 1 and records(run_dir) == after
    assert champion(server.url) == "1"
    # The workspace keeps the release, committed and pushed.
    ws = params.workspace_dir
    assert (ws / "releases" / RELEASE / "train.jsonl").read_bytes() == (
        demo_dir / "releases" / RELEASE / "train.jsonl"
    ).read_bytes()
    assert f"releases/{RELEASE}.dvc" in git(ws, "ls-files")
    assert any(p.is_file() for p in (tmp_path / "dvc-remote").rglob("*"))


def test_outage_between_register_and_promote_leaves_pending(
    tmp_path, tiny_model_dir, demo_dir, server, capsys
):
    params_file = server_params(tmp_path, tiny_model_dir, demo_dir, server.url)
    params = load_params(params_file)
    first = params.workspace_dir / "runs" / "first"
    gated_run(params, tiny_model_dir, demo_dir, dvc_hash="a" * 32).write(first)
    run_stage("register", params, first)
    (mv,) = versions(server.url)
    assert mv.tags["promotion"] == "pending" and mv.tags["gate"] == "passed"

    server.stop()
    count("service fault", "mlflow server stopped between register and promote")
    with pytest.raises(TrackingUnavailable, match=rf"{server.url} is unreachable"):
        run_stage("promote", params, first)
    assert not (first / FILES["promote"]).exists()
    server.start()
    (mv,) = versions(server.url)
    assert mv.tags["promotion"] == "pending" and champion(server.url) is None  # untouched

    code, out = resume_cli(params_file, first, capsys)
    assert code == 0 and "ran promote" in out and f"Model {NAME} v1 is now champion" in out
    assert champion(server.url) == "1"
    (mv,) = versions(server.url)
    assert mv.tags["promotion"].startswith("promoted") and mv.tags["previous_champion"] == "base"

    # A run that stopped after registering while another was promoted: its retention was
    # measured against the base, the champion is v1 now, so resume registers nothing new and
    # promotes nothing.
    second = params.workspace_dir / "runs" / "second"
    gated_run(params, tiny_model_dir, demo_dir, dvc_hash="b" * 32).write(second)
    run_stage("register", params, second)  # ... and the process died here
    count("race", "resume of a run whose champion changed meanwhile")
    assert sorted(str(v.version) for v in versions(server.url)) == ["1", "2"]
    code, out = resume_cli(params_file, second, capsys)
    assert code == 0 and "ran promote" in out and "champion changed from base to 1" in out
    assert champion(server.url) == "1"
    v2 = MlflowClient(server.url, server.url).get_model_version(NAME, "2")
    assert v2.tags["promotion"].startswith("not promoted (champion changed")
    assert not Promotion.read(second / FILES["promote"]).promoted
    code, out = resume_cli(params_file, second, capsys)
    assert code == 0 and "nothing to resume" in out and len(versions(server.url)) == 2

    # A run stopped before registering whose gate failed: resume registers it, tagged failed,
    # and promotes nothing.
    third = params.workspace_dir / "runs" / "third"
    gated_run(params, tiny_model_dir, demo_dir, dvc_hash="e" * 32, passed=False).write(third)
    code, out = resume_cli(params_file, third, capsys)
    assert code == 0 and "ran register, promote" in out and "not promoted: gate failed" in out
    v3 = MlflowClient(server.url, server.url).get_model_version(NAME, "3")
    assert v3.tags["gate"] == "failed" and v3.tags["promotion"] == "not promoted (gate failed)"
    assert champion(server.url) == "1" and len(versions(server.url)) == 3

    # A promote step repeated after the alias moved reports the promotion, changes nothing.
    run_stage("promote", params, first)
    assert Promotion.read(first / FILES["promote"]).promoted
    assert champion(server.url) == "1"
    assert MlflowClient(server.url, server.url).get_model_version(NAME, "1").tags == mv.tags


def test_register_never_duplicates_a_version(
    tmp_path, tiny_model_dir, demo_dir, server, monkeypatch
):
    params = load_params(server_params(tmp_path, tiny_model_dir, demo_dir, server.url))
    run_dir = params.workspace_dir / "runs" / "crash"
    gated_run(params, tiny_model_dir, demo_dir, dvc_hash="c" * 32).write(run_dir)

    # The server goes away right after the model was logged, before the version exists.
    log_model = mlflow.pyfunc.log_model

    def log_then_stop(*args, **kwargs):
        info = log_model(*args, **kwargs)
        server.stop()
        return info

    monkeypatch.setattr(mlflow.pyfunc, "log_model", log_then_stop)
    count("service fault", "mlflow server stopped between logging and registering a model")
    with pytest.raises(TrackingUnavailable) as err:
        run_stage("register", params, run_dir)
    monkeypatch.undo()
    assert f"{server.url} stopped answering while registering {NAME}" in str(err.value)
    assert "forgetless resume RUN_DIR" in str(err.value)
    assert not (run_dir / FILES["register"]).exists()

    server.start()
    assert versions(server.url) == []
    c = MlflowClient(server.url, server.url)
    (crashed,) = c.search_runs([c.get_experiment_by_name("forgetless").experiment_id])
    key = crashed.data.tags[IDEMPOTENCY_TAG]

    run_stage("register", params, run_dir)  # the retry registers it
    first = Registration.read(run_dir / FILES["register"])
    run_stage("register", params, run_dir)  # ... and a repeat finds it
    assert Registration.read(run_dir / FILES["register"]) == first
    # A re-run that trained the same candidate from the same champion finds it too.
    rerun = params.workspace_dir / "runs" / "rerun"
    gated_run(params, tiny_model_dir, demo_dir, dvc_hash="c" * 32).write(rerun)
    again = register(
        RegisterStep.from_params(params),
        VersionedRelease.read(rerun / FILES["version"]),
        ProbeSet.read(rerun / FILES["probes"]),
        TrainResult.read(rerun / FILES["finetune"]),
        EvalReport.read(rerun / FILES["evaluate"]),
        GateDecision.read(rerun / FILES["gate"]),
        rerun,
    )
    assert again == first

    (mv,) = versions(server.url)
    assert (
        str(mv.version) == first.version == "1" and mv.run_id == first.run_id != crashed.info.run_id
    )
    assert mv.tags[IDEMPOTENCY_TAG] == key and mv.tags["promotion"] == "pending"
    assert champion(server.url) is None  # registering never promotes
    # Another candidate (another release) is another version.
    other = params.workspace_dir / "runs" / "other"
    gated_run(params, tiny_model_dir, demo_dir, dvc_hash="d" * 32).write(other)
    run_stage("register", params, other)
    assert sorted(str(v.version) for v in versions(server.url)) == ["1", "2"]


def test_two_registrations_of_one_candidate_racing_keep_one_version(
    tmp_path, tiny_model_dir, demo_dir, server, monkeypatch
):
    """Both look for the candidate's key before either creates its version (a barrier holds
    each before creating): both create one, and both end on the oldest; the younger is gone."""
    params = load_params(server_params(tmp_path, tiny_model_dir, demo_dir, server.url))
    dirs = [params.workspace_dir / "runs" / f"racer-{i}" for i in range(2)]
    for run_dir in dirs:
        gated_run(params, tiny_model_dir, demo_dir, dvc_hash="e" * 32).write(run_dir)
    barrier = threading.Barrier(2, timeout=120)
    create = flows.steps.register._register_new

    def create_after_both_looked(*args, **kwargs):
        barrier.wait()
        return create(*args, **kwargs)

    monkeypatch.setattr(flows.steps.register, "_register_new", create_after_both_looked)
    count("race", "two registrations of one candidate at once")
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda d: run_stage("register", params, d), dirs))
    assert results == [None, None]
    first, second = (Registration.read(d / FILES["register"]) for d in dirs)
    assert first == second  # both runs name the same version
    (kept,) = versions(server.url)  # one version left: the younger was deleted
    assert str(kept.version) == first.version == "1" and kept.run_id == first.run_id
    c = MlflowClient(server.url, server.url)
    runs = c.search_runs([c.get_experiment_by_name("forgetless").experiment_id])
    duplicates = [r for r in runs if "duplicate_of" in r.data.tags]
    assert [r.data.tags["duplicate_of"] for r in duplicates] == [f"{NAME}/1"]
    assert champion(server.url) is None


@pytest.mark.parametrize("remote_kind", ["unwritable folder", "unreachable http remote"])
def test_dvc_remote_failure_keeps_the_release(tmp_path, tiny_model_dir, demo_dir, remote_kind):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the remote's parent folder should be\n")
    remote = (
        str(blocker / "remote")
        if remote_kind == "unwritable folder"
        else f"http://127.0.0.1:{free_port()}/dvc-remote"
    )
    params = load_params(
        write_params(tmp_path, tiny_model_dir, demo_dir, versioning={"remote": remote})
    )
    run_dir = params.workspace_dir / "runs" / "bad-remote"
    source = demo_dir / "releases" / RELEASE
    count("service fault", f"DVC remote: {remote_kind}")
    start = time.perf_counter()
    with pytest.raises(RemoteUnavailable) as err:
        run_stage("version", params, run_dir, source)
    message = str(err.value)
    assert f"DVC remote {remote} cannot be written" in message and "4 attempts" in message
    assert time.perf_counter() - start >= 14
    assert "kept in the workspace" in message and "fix versioning.remote" in message
    assert not (run_dir / FILES["version"]).exists()

    # The release is not lost: in the workspace, tracked by DVC, committed, in the DVC cache.
    ws = params.workspace_dir
    for f in ("train.jsonl", "eval.jsonl"):
        assert (ws / "releases" / RELEASE / f).read_bytes() == (source / f).read_bytes()
    assert f"releases/{RELEASE}.dvc" in git(ws, "ls-files")
    assert f"Release {RELEASE}" in git(ws, "log", "--format=%s")
    assert any(p.is_file() for p in (ws / ".dvc" / "cache").rglob("*"))
    assert champion_version(params.model_store) is None  # nothing registered or promoted
    assert MlflowClient(params.tracking_uri).search_registered_models() == []

    # With the remote fixed, the same step pushes the very same data.
    fixed = params.with_overrides({"versioning.remote": str(tmp_path / "good-remote")})
    run_stage("version", fixed, run_dir, source)
    versioned = VersionedRelease.read(run_dir / FILES["version"])
    assert versioned.path == ws / "releases" / RELEASE
    assert any(p.is_file() for p in (tmp_path / "good-remote").rglob("*"))


def test_unreachable_prefect_api_stops_before_anything_runs(tmp_path, tiny_model_dir, demo_dir):
    params_file = write_params(tmp_path, tiny_model_dir, demo_dir)
    url = f"http://127.0.0.1:{free_port()}/api"
    count("service fault", "Prefect API unreachable when a retrain starts")
    start = time.perf_counter()
    with (
        temporary_settings(updates={PREFECT_API_URL: url}),
        pytest.raises(PrefectUnavailable) as err,
    ):
        retrain(params_file=str(params_file))
    message = str(err.value)
    assert f"Prefect API {url} is unreachable" in message and "4 attempts" in message
    assert "the retrain did not start" in message and "PREFECT_API_URL" in message
    assert time.perf_counter() - start >= 14
    # Nothing ran: no workspace, so no release versioned, no registry, no champion.
    assert not (tmp_path / "workspace").exists() and not (tmp_path / "dvc-remote").exists()


def test_resume_refuses_a_run_that_never_versioned_its_release(
    tmp_path, tiny_model_dir, demo_dir, capsys
):
    params_file = write_params(tmp_path, tiny_model_dir, demo_dir)
    run_dir = tmp_path / "workspace" / "runs" / "empty"
    run_dir.mkdir(parents=True)
    count("bad input", "resume of an empty or missing run folder", 2)
    code, out = resume_cli(params_file, run_dir, capsys)
    assert code == 2 and "nothing to resume" in out and "forgetless run --release" in out
    assert list(run_dir.iterdir()) == []
    code, out = resume_cli(params_file, tmp_path / "nowhere", capsys)
    assert code == 2 and "no such run folder" in out
    assert not (tmp_path / "nowhere").exists()  # nothing made, registered or promoted
    assert sorted(p.name for p in (tmp_path / "workspace").iterdir()) == ["runs"]


def test_resume_uses_the_run_params_and_the_current_services(tmp_path, tiny_model_dir, demo_dir):
    params = load_params(write_params(tmp_path, tiny_model_dir, demo_dir))
    run_dir = tmp_path / "run"
    kept = params.with_overrides({"train.seed": 7, "gate.min_new_task_score": 0.9})
    save_params(run_dir, kept)
    moved = params.with_overrides({"tracking.uri": "http://127.0.0.1:1", "train.seed": 3})
    used = run_params(run_dir, moved)
    assert used.train.seed == 7 and used.gate.min_new_task_score == 0.9  # as the run trained
    assert used.tracking_uri == "http://127.0.0.1:1"  # where the server is now
    assert run_params(tmp_path / "elsewhere", moved) == moved  # no params kept: the file's
