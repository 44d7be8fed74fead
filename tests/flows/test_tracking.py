"""Tracking over HTTP against a real ``mlflow server``, and a clear error when none answers."""

import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from flows.config import load_params
from flows.promote import promote
from flows.records import GateCheck, GateDecision, Registration
from flows.tracking import TrackingUnavailable, champion_version, client, current_champion


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{folder / 'mlflow.db'}",
            "--artifacts-destination",
            str(folder / "artifacts"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError("mlflow server exited") from None
            time.sleep(0.5)
    else:
        proc.kill()
        raise RuntimeError("mlflow server did not start in 120 s")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def test_unreachable_server_is_a_clear_error_before_anything_runs(params_file):
    url = f"http://127.0.0.1:{free_port()}"
    params = load_params(params_file, {"tracking.uri": url})
    start = time.perf_counter()
    with pytest.raises(
        TrackingUnavailable, match=rf"{url} is unreachable .*nothing was registered"
    ):
        current_champion(params)
    assert time.perf_counter() - start < 30


def test_registry_and_promotion_over_http(params_file, mlflow_server):
    params = load_params(params_file, {"tracking.uri": mlflow_server})
    c = client(params)
    assert champion_version(params) is None
    c.create_registered_model("forgetless-lm")
    run = c.create_run(c.create_experiment("http-test"))
    mv = c.create_model_version(
        "forgetless-lm", source=f"runs:/{run.info.run_id}/model", run_id=run.info.run_id
    )
    c.set_model_version_tag("forgetless-lm", mv.version, "gate", "passed")
    reg = Registration(name="forgetless-lm", version=str(mv.version), run_id="r")
    ok = GateDecision(passed=True, checks=[GateCheck(name="x", value=1, threshold=0, passed=True)])
    assert promote(params, reg, ok, None).promoted
    assert champion_version(params) == str(mv.version)
