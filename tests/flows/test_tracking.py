"""Tracking over HTTP against a real ``mlflow server``, a clear error when none answers, and
artifacts that stay in their workspace with the default (SQLite) store."""

import time

import pytest

from flows.core.config import load_params
from flows.core.records import Registration
from flows.registry.tracking import (
    TrackingUnavailable,
    artifact_location,
    champion_version,
    client,
    current_champion,
    experiment_id,
    model_version_dir,
)
from flows.steps.promote import promote
from tests.conftest import write_params
from tests.flows.conftest import PASSED, register_candidate
from tests.flows.mlflow_server import MlflowServer, free_port


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    yield server.url
    server.stop()


def test_unreachable_server_is_a_clear_error_before_anything_runs(params_file):
    url = f"http://127.0.0.1:{free_port()}"
    params = load_params(params_file, {"tracking.uri": url})
    start = time.perf_counter()
    with pytest.raises(
        TrackingUnavailable, match=rf"{url} is unreachable .*nothing was registered"
    ):
        current_champion(params.model_store)
    assert time.perf_counter() - start < 30


def test_registry_and_promotion_over_http(params_file, mlflow_server):
    params = load_params(params_file, {"tracking.uri": mlflow_server})
    c = client(params.model_store)
    assert champion_version(params.model_store) is None
    c.create_registered_model("forgetless-lm")
    assert artifact_location(params.model_store) is None
    experiment = c.get_experiment(experiment_id(params.model_store))
    assert experiment.artifact_location.startswith("mlflow-artifacts:")  # the server's root
    run = c.create_run(experiment.experiment_id)
    mv = c.create_model_version(
        "forgetless-lm", source=f"runs:/{run.info.run_id}/model", run_id=run.info.run_id
    )
    c.set_model_version_tag("forgetless-lm", mv.version, "gate", "passed")
    reg = Registration(name="forgetless-lm", version=str(mv.version), run_id="r")
    ok = PASSED
    assert promote(params.model_store, reg, ok, None).promoted
    assert champion_version(params.model_store) == str(mv.version)


def test_artifacts_stay_in_their_workspace(tmp_path, tiny_model_dir, demo_dir, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # MLflow's default artifact root would be ./mlruns here
    found = {}
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        params = load_params(write_params(tmp_path / name, tiny_model_dir, demo_dir))
        reg = register_candidate(params, tiny_model_dir, demo_dir)
        root = params.workspace_dir / "mlartifacts"
        assert artifact_location(params.model_store) == root.as_uri()
        c = client(params.model_store)
        assert c.get_run(reg.run_id).info.artifact_uri.startswith(root.as_uri() + "/")
        assert (root / reg.run_id / "artifacts" / "gate_report.json").exists()
        stored = c.get_model_version_download_uri(reg.name, reg.version)  # the logged model
        assert stored.startswith(root.as_uri() + "/models/")
        found[name] = {p.relative_to(root) for p in root.rglob("*")}
        # The weights come back from the registry as the folder that was registered, read in
        # place from this workspace's local artifact store (no second copy in cache/).
        weights = model_version_dir(params.model_store, reg.version)
        assert weights.is_relative_to(root / "models")
        assert not (params.workspace_dir / "cache" / "models").exists()
        assert {p.name for p in weights.iterdir()} == {p.name for p in tiny_model_dir.iterdir()}
        assert (weights / "model.safetensors").read_bytes() == (
            tiny_model_dir / "model.safetensors"
        ).read_bytes()
    assert list(elsewhere.iterdir()) == []  # no mlruns/, nothing at all
    runs = [{p.name for p in found[n] if len(p.parts) == 1} - {"models"} for n in "ab"]
    assert runs[0] and runs[1] and not runs[0] & runs[1]  # each workspace has its own run
