"""The production path on the real local stack (``infra/stack.py``, what ``make stack`` starts):
PostgreSQL, an S3 server (moto), ``mlflow server`` on both, ``prefect server`` and one process
worker per pool. The deployments come from ``infra/prefect.yaml``; releases arrive with
``forgetless submit`` into an ``s3://`` landing zone; the retrain runs on the ``cpu`` worker and
its fine-tune as a separate flow run on the ``gpu`` worker, the two exchanging only URLs.

Everything the test checks is read back from the services themselves: flow runs and logs from
the Prefect API, the registry from MLflow (and its PostgreSQL tables), objects from the bucket.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import boto3
import httpx
import pytest
from mlflow import MlflowClient

from flows.core.records import FILES, Promotion, Registration
from tests.conftest import count, write_params

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
BUCKET = "forgetless"
MODEL = "forgetless-lm"


class Stack:
    """The stack of one test module: its folder, environment, and the checkout its workers
    run flows from (``FORGETLESS_HOME``: the code, linked, and the test's params.yaml)."""

    def __init__(self, home: Path, checkout: Path, env: dict[str, str]) -> None:
        self.home, self.checkout, self.env = home, checkout, env
        self.api = env["PREFECT_API_URL"]

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run(
            argv, cwd=self.checkout, env=self.env, capture_output=True, text=True, timeout=600
        )
        if check and done.returncode:
            raise AssertionError(f"{' '.join(argv)} failed:\n{done.stdout}\n{done.stderr}")
        return done

    def forgetless(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.run(str(BIN / "forgetless"), "--params", "params.yaml", *args, check=check)

    def post(self, path: str, body: dict) -> list[dict]:
        response = httpx.post(f"{self.api}{path}", json=body, timeout=30)
        response.raise_for_status()
        return response.json()

    def flow_runs(self, deployment: str) -> list[dict]:
        """Flow runs of a deployment (``flow/deployment``), oldest first; not the upcoming
        Monday ticks the scheduler creates ahead of time."""
        flow, name = deployment.split("/")
        (dep,) = [
            d
            for d in self.post("/deployments/filter", {"deployments": {"name": {"any_": [name]}}})
            if d["flow_id"] == self.flow_id(flow)
        ]
        runs = self.post(
            "/flow_runs/filter",
            {
                "flow_runs": {"deployment_id": {"any_": [dep["id"]]}},
                "sort": "EXPECTED_START_TIME_ASC",
            },
        )
        return sorted((r for r in runs if not r["auto_scheduled"]), key=lambda r: r["created"])

    def flow_id(self, name: str) -> str:
        (flow,) = self.post("/flows/filter", {"flows": {"name": {"any_": [name]}}})
        return flow["id"]

    def wait_runs(self, deployment: str, n: int, seconds: float = 900) -> list[dict]:
        """Wait until the deployment has ``n`` flow runs, all in a final state."""
        deadline = time.time() + seconds
        while True:
            runs = self.flow_runs(deployment)
            final = [r for r in runs if r["state_type"] in {"COMPLETED", "FAILED", "CRASHED"}]
            if len(runs) >= n and len(final) == len(runs):
                return runs
            assert time.time() < deadline, f"{deployment}: {[r['state_name'] for r in runs]}"
            time.sleep(2)

    def logs(self, flow_run_id: str, expect: str = "", seconds: float = 60) -> str:
        """A flow run's logs; with ``expect``, once they hold it (or ``seconds`` pass): the
        API stores logs in batches, a little after the run."""
        deadline = time.time() + seconds
        while True:
            rows = self.post("/logs/filter", {"logs": {"flow_run_id": {"any_": [flow_run_id]}}})
            text = "\n".join(r["message"] for r in rows)
            if expect in text or time.time() > deadline:
                return text
            time.sleep(1)

    def registry(self) -> MlflowClient:
        uri = self.env["MLFLOW_TRACKING_URI"]
        return MlflowClient(tracking_uri=uri, registry_uri=uri)

    def s3_keys(self, prefix: str) -> list[str]:
        s3 = boto3.client(
            "s3",
            endpoint_url=self.env["AWS_ENDPOINT_URL"],
            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
            region_name=self.env["AWS_DEFAULT_REGION"],
        )
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def sql(self, query: str) -> str:
        state = json.loads((self.home / "stack" / "stack.json").read_text())
        port = str(state["postgres"]["port"])
        return self.run(
            "psql", "-h", "127.0.0.1", "-p", port, "-U", "forgetless", "-d", "mlflow", "-tAc", query
        ).stdout.strip()


def split_release(source: Path, out: Path, parts: int) -> list[Path]:
    """``parts`` releases with disjoint records of ``source`` (new content, new names)."""
    made = []
    for i in range(parts):
        folder = out / f"{source.name}-part{i + 1}"
        folder.mkdir(parents=True)
        for split in ("train.jsonl", "eval.jsonl"):
            lines = (source / split).read_text().splitlines()
            (folder / split).write_text("\n".join(lines[i::parts]) + "\n")
        made.append(folder)
    return made


@pytest.fixture(scope="module")
def stack(tiny_model_dir, demo_dir):
    home = Path(tempfile.mkdtemp(prefix="forgetless-stack-"))  # PostgreSQL's user must reach it
    home.chmod(0o755)
    checkout = home / "checkout"
    checkout.mkdir()
    for name in ("flows", "cf_strategies"):
        (checkout / name).symlink_to(ROOT / name)
    write_params(
        checkout,
        tiny_model_dir,
        demo_dir,
        data={"landing": f"s3://{BUCKET}/releases/"},
        train={"max_steps": 24},
        gate={"min_retention": 0.0, "min_new_task_score": 0.0, "beat_champion": True},
        tracking={"promote_lock": "prefect"},
        versioning={"remote": f"s3://{BUCKET}/dvc"},
        deploy={
            "finetune_remote": True,
            "evaluate_remote": True,
            "handoff": f"s3://{BUCKET}/handoff",
        },
    )
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    base_env |= {
        "FORGETLESS_HOME": str(checkout),
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        "OMP_NUM_THREADS": "1",
    }
    up = subprocess.run(
        [sys.executable, str(ROOT / "infra" / "stack.py"), "up", "--dir", str(home / "stack")]
        + ["--params", str(checkout / "params.yaml"), "--no-ui"],
        env=base_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    stack_file = home / "stack" / "env"
    try:
        assert up.returncode == 0, up.stderr
        env = dict(base_env)
        for line in stack_file.read_text().splitlines():
            key, _, value = line.removeprefix("export ").partition("=")
            env[key] = json.loads(value)
        yield Stack(home, checkout, env)
    finally:
        subprocess.run(
            [
                sys.executable,
                str(ROOT / "infra" / "stack.py"),
                "down",
                "--dir",
                str(home / "stack"),
            ],
            env=base_env,
            capture_output=True,
            timeout=300,
        )
        shutil.rmtree(home, ignore_errors=True)


def test_landed_releases_retrain_on_the_stack_with_the_fine_tune_on_the_gpu_pool(
    stack, demo_dir, tmp_path
):
    deployed = stack.run(
        str(BIN / "prefect"), "--no-prompt", "deploy", "--all",
        "--prefect-file", str(ROOT / "infra" / "prefect.yaml"),
    )  # fmt: skip
    assert "retrain" in deployed.stdout and "finetune" in deployed.stdout

    # A release submitted: the event triggers the retrain on the cpu pool, which fine-tunes on
    # the gpu pool; the gate passes, the version is registered and becomes the champion.
    first = stack.forgetless("submit", str(demo_dir / "releases" / "wiki-topics-1"))
    assert "landed" in first.stdout, first.stdout
    (retrain,) = stack.wait_runs("forgetless-retrain/retrain", 1)
    logs = stack.logs(retrain["id"], expect="gate passed")
    assert retrain["state_type"] == "COMPLETED", logs
    (tuned,) = stack.wait_runs("forgetless-finetune/finetune", 1)
    assert tuned["state_type"] == "COMPLETED" and tuned["work_pool_name"] == "gpu"
    assert retrain["work_pool_name"] == "cpu"
    assert tuned["parent_task_run_id"]  # a subflow of the retrain: linked in the UI
    assert "gate passed" in logs, logs

    client = stack.registry()
    (v1,) = client.search_model_versions(f"name='{MODEL}'")
    assert v1.tags["gate"] == "passed" and v1.tags["release"] == "wiki-topics-1"
    assert client.get_model_version_by_alias(MODEL, "champion").version == v1.version
    # the registry is PostgreSQL's, the weights are in the bucket, the release in the DVC remote
    assert stack.sql(f"select version from model_versions where name = '{MODEL}'") == "1"
    artifacts = stack.s3_keys("mlflow/")
    assert any(k.endswith("model.safetensors") for k in artifacts), artifacts[:20]
    ws = stack.checkout / "workspace"
    dvc_md5 = (ws / "releases" / "wiki-topics-1.dvc").read_text().split("md5: ")[1].split()[0]
    dvc_keys = stack.s3_keys("dvc/")
    assert f"dvc/files/md5/{dvc_md5[:2]}/{dvc_md5[2:]}" in dvc_keys, dvc_keys[:10]
    # only URLs crossed the pools: the release went up, the candidate came back; once copied
    # here, the handoff keeps the GPU run's records but no copy of the weights or the release
    handoff = stack.s3_keys("handoff/")
    assert any(k.endswith("/train_result.json") for k in handoff), handoff
    assert not [k for k in handoff if "candidate_model/" in k or "/releases/" in k], handoff
    assert not [k for k in handoff if k.startswith("handoff/probes/")], handoff
    # the GPU pool also scored the candidate (deploy.evaluate_remote); its per-item results
    # came back into the run folder, where register logs them
    assert "evaluated here" in stack.logs(tuned["id"], expect="evaluated here")
    assert any(k.endswith("evaluation/eval_report.json") for k in handoff), handoff
    (run_dir,) = (ws / "runs").glob("wiki-topics-1-*")
    assert (run_dir / "candidate" / "probes.jsonl").read_text().strip()
    # credentials stay in the environment: not in MLflow params, tags or the flow's logs
    run = client.get_run(v1.run_id)
    logged = json.dumps([run.data.params, run.data.tags]) + logs
    for secret in ("PGPASSWORD", "AWS_SECRET_ACCESS_KEY"):
        assert stack.env[secret] not in logged

    # A scheduled tick with nothing new: completed, nothing trained or registered.
    stack.run(str(BIN / "prefect"), "deployment", "run", "forgetless-retrain/retrain")
    tick = stack.wait_runs("forgetless-retrain/retrain", 2)[-1]
    assert tick["state_type"] == "COMPLETED" and "no new release" in stack.logs(
        tick["id"], expect="no new release"
    )
    assert len(stack.flow_runs("forgetless-finetune/finetune")) == 1
    assert len(client.search_model_versions(f"name='{MODEL}'")) == 1

    # Two submits in a row: two triggered runs, one after the other, each on its own release.
    two, three = split_release(demo_dir / "releases" / "wiki-topics-2", tmp_path, 2)
    stack.forgetless("submit", str(two))
    stack.forgetless("submit", str(three))
    runs = stack.wait_runs("forgetless-retrain/retrain", 4)[2:]
    assert [r["state_type"] for r in runs] == ["COMPLETED", "COMPLETED"]
    a_end = datetime.fromisoformat(runs[0]["end_time"])
    b_start = datetime.fromisoformat(runs[1]["start_time"])
    assert a_end <= b_start, "the two retrains ran at the same time"
    assert len(stack.wait_runs("forgetless-finetune/finetune", 3)) == 3
    releases = sorted(v.tags["release"] for v in client.search_model_versions(f"name='{MODEL}'"))
    assert releases == ["wiki-topics-1", two.name, three.name]


def test_an_mlflow_outage_mid_run_fails_clearly_and_resume_finishes_it(stack, demo_dir, tmp_path):
    """Depends on the stack the first test deployed to (same module)."""
    client = stack.registry()
    champion = client.get_model_version_by_alias(MODEL, "champion").version
    (release,) = split_release(demo_dir / "releases" / "wiki-topics-2", tmp_path / "r", 1)
    release = release.rename(release.with_name("wiki-topics-2-outage"))
    before = len(stack.flow_runs("forgetless-retrain/retrain"))
    tuned_before = len(stack.flow_runs("forgetless-finetune/finetune"))
    stack.forgetless("submit", str(release))
    # The MLflow server stops while the fine-tune trains on the GPU pool (its champion read).
    deadline = time.time() + 600
    while True:
        tuning = stack.flow_runs("forgetless-finetune/finetune")[tuned_before:]
        if tuning and "from champion" in stack.logs(tuning[0]["id"]):
            break
        assert time.time() < deadline, "the fine-tune flow run never started training"
        time.sleep(0.5)
    stack.run(sys.executable, str(ROOT / "infra" / "stack.py"), "stop-mlflow", "--dir",
              str(stack.home / "stack"))  # fmt: skip
    failed = stack.wait_runs("forgetless-retrain/retrain", before + 1)[-1]
    assert failed["state_type"] == "FAILED"
    logs = stack.logs(failed["id"], expect="unreachable")
    assert "MLflow tracking server" in logs and "unreachable" in logs, logs[-3000:]
    assert "nothing was registered or promoted" in logs
    count("service fault", "MLflow server stopped mid-run on the stack")

    stack.run(sys.executable, str(ROOT / "infra" / "stack.py"), "start-mlflow", "--dir",
              str(stack.home / "stack"))  # fmt: skip
    assert client.get_model_version_by_alias(MODEL, "champion").version == champion
    assert release.name not in [
        v.tags.get("release") for v in client.search_model_versions(f"name='{MODEL}'")
    ]
    (run_dir,) = (stack.checkout / "workspace" / "runs").glob(f"{release.name}-*")
    assert (run_dir / FILES["finetune"]).exists() and not (run_dir / FILES["register"]).exists()
    resumed = stack.forgetless("resume", str(run_dir))
    assert "promote" in resumed.stdout, resumed.stdout
    registration = Registration.read(run_dir / FILES["register"])
    registered = client.get_model_version(MODEL, registration.version)
    assert registered.tags["release"] == release.name
    promotion = Promotion.read(run_dir / FILES["promote"])
    now = client.get_model_version_by_alias(MODEL, "champion").version
    assert now == (registration.version if promotion.promoted else champion)
    assert registered.tags["promotion"] != "pending"
