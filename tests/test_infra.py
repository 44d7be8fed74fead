"""The deployment files parse and point at things that exist."""

import importlib
import inspect
import re
from pathlib import Path

import yaml
from prefect import Flow
from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"


def test_prefect_deployments_point_at_the_real_flow_with_valid_parameters():
    spec = yaml.safe_load((INFRA / "prefect.yaml").read_text())
    assert spec["deployments"]
    for dep in spec["deployments"]:
        path, name = dep["entrypoint"].split(":")
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        flow = getattr(module, name)
        assert isinstance(flow, Flow)
        accepted = set(inspect.signature(flow.fn).parameters)
        assert set(dep.get("parameters", {})) <= accepted, dep["name"]
        assert dep["concurrency_limit"] == 1, dep["name"]  # never two retrains of one model
        triggers = DeploymentEventTrigger.model_validate_list(dep.get("triggers", []))
        for trigger in triggers:  # what `prefect deploy` would build from the file
            assert trigger.expect == {"forgetless.release.landed"}
    (gpu,) = [d for d in spec["deployments"] if d["name"] == "retrain-gpu"]
    assert gpu["schedules"] and gpu["triggers"]


def test_compose_and_kubernetes_files_parse():
    compose = yaml.safe_load((INFRA / "docker-compose.yml").read_text())
    assert {"mlflow", "prefect", "worker-cpu", "worker-gpu"} <= set(compose["services"])
    for manifest in (INFRA / "k8s").glob("*.yaml"):
        docs = [d for d in yaml.safe_load_all(manifest.read_text()) if d]
        assert all({"apiVersion", "kind", "metadata"} <= set(d) for d in docs), manifest


def test_dockerfile_copies_files_that_exist():
    copied = re.findall(r"^COPY (.+) \S+$", (INFRA / "Dockerfile").read_text(), flags=re.M)
    for line in copied:
        for src in line.split():
            assert (ROOT / src).exists(), src
