"""Step 4 on a GPU node: the fine-tune step as its own Prefect flow, deployed to the GPU pool.

With ``deploy.finetune_remote`` the retrain flow (on the CPU pool) does not fine-tune in its own
process. It puts the release into ``deploy.handoff`` (a URL both pools reach, e.g.
``s3://forgetless/handoff/``) and starts the ``forgetless-finetune`` deployment with
``run_deployment``. The GPU worker's flow run then:

1. reads the champion from the MLflow registry by version (``models:/<name>/<version>``), or
   resolves the base model;
2. copies the release from the handoff folder and runs ``flows.steps.finetune.finetune``;
3. writes the candidate folder and ``train_result.json`` back to the handoff folder.

Only URIs cross the pools, never a local path. The retrain then copies the candidate into its
run folder and goes on (evaluate, gate, register, promote) as in one process. With
``deploy.evaluate_remote`` the GPU flow run also scores the candidate on the probe set's test
part and the new task (the probe files and the champion's per-item results go up with the
release), and the evaluate step copies its report and per-item results back. Once copied
here, the handoff's copies of the weights, the release and the probes are deleted; the GPU run's
records (``train_result.json``, ``evaluation/``) stay. Without ``deploy.finetune_remote`` the fine-tune runs in the retrain's process (``train_candidate``).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from fsspec.core import url_to_fs
from prefect import flow, get_run_logger
from prefect.exceptions import MissingContextError

from flows.core.config import Params
from flows.core.records import FILES, ChampionRef, EvalReport, ProbeSet, TrainResult
from flows.production import launch
from flows.registry.tracking import base_model_dir, model_version_dir
from flows.steps.evaluate import EvaluateStep, evaluate_candidate
from flows.steps.finetune import FinetuneStep

CANDIDATE = "candidate_model"
EVALUATION = "evaluation"  # the GPU's scores of the candidate (deploy.evaluate_remote)


class RemoteFinetuneFailed(RuntimeError):
    """The fine-tune flow run on the GPU pool did not complete; nothing was trained here."""


def handoff_url(params: Params, *parts: str) -> str:
    return "/".join([str(params.deploy.handoff).rstrip("/"), *parts])


def upload(local: Path, url: str) -> str:
    fs, path = url_to_fs(url)
    fs.put(str(local) + "/", path, recursive=True)
    return url


def download(url: str, local: Path) -> Path:
    fs, path = url_to_fs(url)
    if not fs.exists(path):
        raise FileNotFoundError(f"{url}: nothing there (the handoff folder, deploy.handoff)")
    local.mkdir(parents=True, exist_ok=True)
    fs.get(path.rstrip("/") + "/", str(local) + "/", recursive=True)
    return local


def remove(*urls: str) -> None:
    """Delete folders of the handoff (those that exist)."""
    for url in urls:
        fs, path = url_to_fs(url)
        if fs.exists(path):
            fs.rm(path, recursive=True)


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """The flow run's logger, or this module's outside a flow (``forgetless step``)."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)


def run_key(params: Params, run_dir: Path) -> str:
    """The run folder's name under ``workspace/runs`` (a tournament candidate's included): one
    handoff folder per run, never shared by two retrains."""
    runs = params.workspace_dir / "runs"
    run_dir = Path(run_dir).resolve()
    return run_dir.relative_to(runs).as_posix() if run_dir.is_relative_to(runs) else run_dir.name


def train_candidate(
    params: Params,
    champion: ChampionRef,
    release_dir: Path,
    run_dir: Path,
    probe_set: ProbeSet | None = None,
) -> TrainResult:
    """The fine-tune step, here or on the GPU pool (``deploy.finetune_remote``; with
    ``deploy.evaluate_remote`` the GPU also scores the candidate on ``probe_set``'s test part)."""
    if not params.deploy.finetune_remote:
        return launch.train(FinetuneStep.from_params(params), champion, release_dir, run_dir)
    return finetune_on_gpu_pool(params, champion, release_dir, run_dir, probe_set)


def evaluate_where_trained(
    params: Params,
    candidate_dir: Path,
    probe_set: ProbeSet,
    release_dir: Path,
    run_dir: Path,
    part: str = "test",
    out_dir: Path | None = None,
) -> EvalReport:
    """The evaluate step: the GPU pool's scores when it evaluated (``deploy.evaluate_remote``),
    copied into the run folder; otherwise ``evaluate_candidate`` here."""
    if params.deploy.evaluate_remote and part == "test" and out_dir is None:
        url = f"{handoff_url(params, 'runs', run_key(params, run_dir))}/{EVALUATION}"
        download(f"{url}/candidate", run_dir / "candidate")
        fs, path = url_to_fs(f"{url}/{FILES['evaluate']}")
        if fs.exists(url_to_fs(f"{url}/references")[1]):  # the champion scored there as well
            download(f"{url}/references", run_dir / "references")
        report = EvalReport.model_validate_json(fs.cat_file(path))
        remove(handoff_url(params, "probes", run_key(params, run_dir)))  # scored: not needed
        return report
    return evaluate_candidate(
        EvaluateStep.from_params(params),
        candidate_dir,
        probe_set,
        release_dir,
        run_dir,
        part,
        out_dir,
    )


def check_deployment_pool(params: Params) -> None:
    """The fine-tune deployment must run on ``deploy.gpu_pool``: a deployment on another pool
    would train wherever that pool runs."""
    from prefect.client.orchestration import get_client

    name = params.deploy.finetune_deployment
    with get_client(sync_client=True) as client:
        try:
            deployment = client.read_deployment_by_name(name)
        except Exception as err:
            raise RemoteFinetuneFailed(
                f"deployment {name!r} (deploy.finetune_deployment) not found on the Prefect "
                f"server ({type(err).__name__}): deploy it with `prefect deploy --prefect-file "
                "infra/prefect.yaml --all`"
            ) from err
    if deployment.work_pool_name != params.deploy.gpu_pool:
        raise RemoteFinetuneFailed(
            f"deployment {name!r} runs on work pool {deployment.work_pool_name!r}, but "
            f"deploy.gpu_pool is {params.deploy.gpu_pool!r}: deploy it to that pool or fix "
            "params.yaml"
        )


def finetune_on_gpu_pool(
    params: Params,
    champion: ChampionRef,
    release_dir: Path,
    run_dir: Path,
    probe_set: ProbeSet | None = None,
) -> TrainResult:
    """Start the fine-tune flow on the GPU pool, wait for it, and copy its candidate here."""
    from prefect.deployments import run_deployment

    check_deployment_pool(params)
    log = run_logger()
    key = run_key(params, run_dir)
    # under its own name: the release's name is the new task's name (scores, task routes)
    release_url = upload(release_dir, handoff_url(params, "releases", key, release_dir.name))
    out_url = handoff_url(params, "runs", key)
    probes = None
    if params.deploy.evaluate_remote:
        if probe_set is None:
            raise ValueError("deploy.evaluate_remote: the fine-tune step needs the probe set")
        probes = upload_probes(probe_set, handoff_url(params, "probes", key))
    log.info(f"fine-tune on work pool {params.deploy.gpu_pool}: {release_url} -> {out_url}")
    run = run_deployment(
        params.deploy.finetune_deployment,
        parameters={
            "params": params.model_dump(mode="json", exclude={"root"}),
            "champion_version": champion.version,
            "champion_releases": champion.releases,
            "release_url": release_url,
            "out_url": out_url,
            "probes": probes,
        },
        flow_run_name=f"finetune-{key.replace('/', '-')}",
        timeout=params.deploy.timeout_minutes * 60,
    )
    state = run.state
    if state is None or not state.is_completed():
        raise RemoteFinetuneFailed(
            f"fine-tune flow run {run.name} ({run.id}) on work pool {params.deploy.gpu_pool} "
            f"ended {state.name if state else 'without a state'}: "
            f"{state.message if state else ''} — see its logs in Prefect; nothing was trained "
            "here, run the retrain again (or `forgetless resume`) once the pool is healthy"
        )
    local = download(f"{out_url}/{CANDIDATE}", run_dir / CANDIDATE)
    fs, path = url_to_fs(f"{out_url}/{FILES['finetune']}")
    result = TrainResult.model_validate_json(fs.cat_file(path))
    # the weights are here now: the handoff keeps the GPU run's records, not a copy of them
    remove(f"{out_url}/{CANDIDATE}", handoff_url(params, "releases", key))
    log.info(f"candidate copied to {local}; its handoff copy and the release's were removed")
    return result.model_copy(update={"model_dir": local})


def upload_probes(probe_set: ProbeSet, url: str) -> dict[str, Any]:
    """The probe set's test part and the champion's per-item results, for the GPU to evaluate
    on; returns the probe set record with those parts as URLs."""
    fs, path = url_to_fs(f"{url}/test.jsonl")
    fs.put_file(str(probe_set.path), path)
    record = probe_set.model_dump(mode="json") | {"path": f"{url}/test.jsonl", "dev_path": None}
    if probe_set.champion_results is not None:
        record["champion_results"] = upload(probe_set.champion_results, f"{url}/champion")
    if probe_set.anchor_results is not None:
        fs.put_file(str(probe_set.anchor_results), url_to_fs(f"{url}/anchors.jsonl")[1])
        record["anchor_results"] = f"{url}/anchors.jsonl"
    return record


def probes_here(record: dict[str, Any], folder: Path, champion: ChampionRef) -> ProbeSet:
    """The uploaded probe set, copied to this node, as a record with local paths (the
    champion's folder too: a reference scored again under this node's conditions)."""
    folder.mkdir(parents=True, exist_ok=True)
    fs, path = url_to_fs(record["path"])
    fs.get_file(path, str(folder / "test.jsonl"))
    local = record | {"path": str(folder / "test.jsonl")}
    local["champion"] = record["champion"] | {"model_dir": str(champion.model_dir)}
    if record.get("champion_results"):
        local["champion_results"] = str(download(record["champion_results"], folder / "champion"))
    if record.get("anchor_results"):
        fs, path = url_to_fs(record["anchor_results"])
        fs.get_file(path, str(folder / "anchors.jsonl"))
        local["anchor_results"] = str(folder / "anchors.jsonl")
    return ProbeSet.model_validate(local)


def champion_here(params: Params, version: str | None, releases: list[str]) -> ChampionRef:
    """The champion on this node: the registered version from MLflow, or the base model."""
    if version is None:
        return ChampionRef(version=None, model_dir=base_model_dir(params.model_store), releases=[])
    return ChampionRef(
        version=version, model_dir=model_version_dir(params.model_store, version), releases=releases
    )


@flow(name="forgetless-finetune", log_prints=True)
def finetune_flow(
    params: dict[str, Any],
    champion_version: str | None,
    champion_releases: list[str],
    release_url: str,
    out_url: str,
    probes: dict[str, Any] | None = None,
) -> str:
    """Fine-tune on this worker (the GPU pool): the release from ``release_url``, the champion
    from the registry; the candidate and its ``train_result.json`` go to ``out_url``. With
    ``probes`` (``deploy.evaluate_remote``) the candidate is also scored here on the test part,
    its per-item results and ``eval_report.json`` in ``out_url/evaluation``."""
    log = run_logger()
    config = Params.model_validate(params | {"root": str(Path.cwd())})
    # this node's own folder for the run (a retry of the flow run resumes from its checkpoints)
    work = Path(tempfile.gettempdir()) / "forgetless-gpu-runs" / out_url.split("/runs/", 1)[-1]
    release = download(release_url, work / release_url.rstrip("/").rsplit("/", 1)[-1])
    champion = champion_here(config, champion_version, champion_releases)
    log.info(f"fine-tune {config.train.strategy} from champion {champion_version or 'base'}")
    result = launch.train(FinetuneStep.from_params(config), champion, release, work)
    if probes is not None:
        probe_set = probes_here(probes, work / "probes", champion)
        report = evaluate_candidate(
            EvaluateStep.from_params(config), result.model_dir, probe_set, release, work
        )
        log.info(f"evaluated here: new task {report.new_task_score:.3f}, {report.retention}")
        upload(work / "candidate", f"{out_url}/{EVALUATION}/candidate")
        if (work / "references").is_dir():
            upload(work / "references", f"{out_url}/{EVALUATION}/references")
        fs, path = url_to_fs(f"{out_url}/{EVALUATION}/{FILES['evaluate']}")
        fs.pipe_file(path, report.model_dump_json().encode())
    upload(result.model_dir, f"{out_url}/{CANDIDATE}")
    fs, path = url_to_fs(f"{out_url}/{FILES['finetune']}")
    fs.pipe_file(path, result.model_dump_json().encode())  # last: the candidate is complete
    shutil.rmtree(work, ignore_errors=True)
    return out_url
