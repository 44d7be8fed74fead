"""The fine-tune step on another pool, what is checked before it starts (a real Prefect API, the
test harness) and how files cross the pools (fsspec's in-memory filesystem). The whole path on
real workers is tests/flows/test_stack.py."""

from __future__ import annotations

import contextlib
import os
import uuid

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.exceptions import ObjectAlreadyExists

from flows.core.config import ParamsError, load_params
from flows.production.remote_finetune import (
    RemoteFinetuneFailed,
    check_deployment_pool,
    download,
    upload,
)
from tests.conftest import count, write_params


def remote_params(tmp_path, tiny_model_dir, demo_dir, **deploy):
    deploy = {"finetune_remote": True, "handoff": "memory://handoff"} | deploy
    return load_params(write_params(tmp_path, tiny_model_dir, demo_dir, deploy=deploy))


def test_a_remote_fine_tune_needs_a_handoff_url_both_pools_reach(
    tmp_path, tiny_model_dir, demo_dir
):
    with pytest.raises(ParamsError, match="finetune_remote needs deploy.handoff"):
        remote_params(tmp_path, tiny_model_dir, demo_dir, handoff=None)
    with pytest.raises(ParamsError, match="not a local path"):
        remote_params(tmp_path, tiny_model_dir, demo_dir, handoff=str(tmp_path / "handoff"))
    count("bad input", "remote fine-tune without a shared handoff URL")


@pytest.mark.usefixtures("prefect_harness")
def test_the_fine_tune_deployment_must_exist_and_run_on_the_gpu_pool(
    tmp_path, tiny_model_dir, demo_dir
):
    name = f"finetune-{uuid.uuid4().hex[:6]}"
    params = remote_params(
        tmp_path, tiny_model_dir, demo_dir, finetune_deployment=f"forgetless-finetune/{name}"
    )
    with pytest.raises(RemoteFinetuneFailed, match=f"forgetless-finetune/{name}.*not found"):
        check_deployment_pool(params)
    with get_client(sync_client=True) as client:
        for pool in ("cpu", "gpu"):
            with contextlib.suppress(ObjectAlreadyExists):  # made by an earlier test
                client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
        flow_id = client.create_flow_from_name("forgetless-finetune")
        client.create_deployment(flow_id=flow_id, name=name, work_pool_name="cpu")
    with pytest.raises(RemoteFinetuneFailed, match="runs on work pool 'cpu'.*gpu_pool is 'gpu'"):
        check_deployment_pool(params)
    check_deployment_pool(params.with_overrides({"deploy.gpu_pool": "cpu"}))  # names agree
    count("bad input", "fine-tune deployment missing or on another pool")


def test_release_and_candidate_cross_as_urls(tmp_path):
    folder = tmp_path / "candidate_model"
    (folder / "strategy_state").mkdir(parents=True)
    (folder / "config.json").write_text('{"a": 1}')
    (folder / "strategy_state" / "ewc.pt").write_bytes(b"\0\1\2")
    url = f"memory://handoff/{uuid.uuid4().hex}/candidate_model"
    assert upload(folder, url) == url
    back = download(url, tmp_path / "back")
    files = sorted(p.relative_to(back).as_posix() for p in back.rglob("*") if p.is_file())
    assert files == ["config.json", "strategy_state/ewc.pt"]
    assert (back / "strategy_state" / "ewc.pt").read_bytes() == b"\0\1\2"
    with pytest.raises(FileNotFoundError, match="nothing there"):
        download("memory://handoff/missing", tmp_path / "none")


def test_the_tracking_endpoint_comes_from_the_environment_not_from_mlflows_own_variable(
    tmp_path, tiny_model_dir, demo_dir, monkeypatch
):
    """A stack's workers get the endpoint as FORGETLESS_TRACKING_URI. MLFLOW_TRACKING_URI is
    not read: mlflow.set_tracking_uri rewrites it, so one retrain's store would leak into the
    next retrain of the process (and its children) that has its own."""
    import mlflow

    params = load_params(write_params(tmp_path, tiny_model_dir, demo_dir))
    own = f"sqlite:///{tmp_path / 'workspace' / 'mlflow.db'}"
    monkeypatch.delenv("FORGETLESS_TRACKING_URI", raising=False)
    previous = mlflow.get_tracking_uri()
    try:
        mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'another-retrain.db'}")
        assert "another-retrain" in os.environ["MLFLOW_TRACKING_URI"]  # what mlflow does
        assert params.tracking_uri == own
    finally:
        mlflow.set_tracking_uri(previous)
    monkeypatch.setenv("FORGETLESS_TRACKING_URI", "http://127.0.0.1:5999")
    assert params.tracking_uri == "http://127.0.0.1:5999"
    assert params.with_overrides({"tracking.uri": "http://x:1"}).tracking_uri == "http://x:1"
