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
    (retrain,) = [d for d in spec["deployments"] if d["name"] == "retrain"]
    assert retrain["schedules"] and retrain["triggers"]


def test_deployments_run_on_the_pools_params_yaml_names():
    """The retrain on deploy.cpu_pool, the fine-tune on deploy.gpu_pool, under the name the
    retrain starts it by (deploy.finetune_deployment)."""
    from flows.core.config import load_params

    deploy = load_params(ROOT / "params.yaml").deploy
    spec = yaml.safe_load((INFRA / "prefect.yaml").read_text())
    pools = {d["entrypoint"]: d["work_pool"]["name"] for d in spec["deployments"]}
    assert pools == {
        "flows/drivers/retrain.py:retrain": deploy.cpu_pool,
        "flows/production/remote_finetune.py:finetune_flow": deploy.gpu_pool,
    }
    (finetune,) = [d for d in spec["deployments"] if d["entrypoint"].endswith("finetune_flow")]
    assert deploy.finetune_deployment == f"forgetless-finetune/{finetune['name']}"


def test_compose_and_kubernetes_files_parse():
    compose = yaml.safe_load((INFRA / "docker-compose.yml").read_text())
    assert {"postgres", "s3", "mlflow", "prefect", "worker-cpu", "worker-gpu"} <= set(
        compose["services"]
    )
    for manifest in (INFRA / "k8s").glob("*.yaml"):
        docs = [d for d in yaml.safe_load_all(manifest.read_text()) if d]
        assert all({"apiVersion", "kind", "metadata"} <= set(d) for d in docs), manifest


def test_gpu_pool_job_template_requests_a_gpu_node_and_takes_secrets_by_reference():
    import json

    template = json.loads((INFRA / "k8s" / "gpu-pool-job-template.json").read_text())
    assert {"job_configuration", "variables"} == set(template)
    pod = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_count }}"
    assert template["variables"]["properties"]["gpu_count"]["default"] >= 1
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"secretRef": {"name": "forgetless-credentials"}} in container["envFrom"]
    # every {{ placeholder }} of the job is a declared variable
    used = set(re.findall(r"{{ (\w+) }}", json.dumps(template["job_configuration"])))
    assert used <= set(template["variables"]["properties"]), used


def test_no_secret_is_written_in_the_infra_files():
    """Credentials are passed by reference (env_file, secretKeyRef, the environment)."""
    for f in [*INFRA.rglob("*.y*ml"), *INFRA.rglob("*.json"), ROOT / "params.yaml"]:
        text = re.sub(r"#.*", "", f.read_text())  # what is read, not what is said about it
        assert not re.search(r"(PASSWORD|SECRET_ACCESS_KEY)\s*[:=]\s*['\"]?[A-Za-z0-9]", text), f


def test_dockerfile_copies_files_that_exist():
    copied = re.findall(r"^COPY (.+) \S+$", (INFRA / "Dockerfile").read_text(), flags=re.M)
    for line in copied:
        for src in line.split():
            assert (ROOT / src).exists(), src
