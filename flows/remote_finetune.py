"""Step 4 on a GPU node: the fine-tune step as its own Prefect flow, deployed to the GPU pool.

With ``deploy.finetune_remote`` the retrain flow (on the CPU pool) does not fine-tune in its own
process. It puts the release into ``deploy.handoff`` (a URL both pools reach, e.g.
``s3://forgetless/handoff/``) and starts the ``forgetless-finetune`` deployment with
``run_deployment``. The GPU worker's flow run then:

1. reads the champion from the MLflow registry by version (``models:/<name>/<version>``), or
   resolves the base model;
2. copies the release from the handoff folder and runs ``flows.finetune.finetune``;
3. writes the candidate folder and ``train_result.json`` back to the handoff folder.

Only URIs cross the pools, never a local path. The retrain then copies the candidate into its
run folder and goes on (evaluate, gate, register, promote) as in one process. Without
``deploy.finetune_remote`` the fine-tune runs in the retrain's process (``train_candidate``).
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

from flows.config import Params
from flows.finetune import finetune
from flows.model_source import resolve_model
from flows.records import FILES, ChampionRef, TrainResult
from flows.tracking import model_version_dir

CANDIDATE = "candidate_model"


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


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """The flow run's logger, or this module's outside a flow (``forgetless step``)."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)


def train_candidate(
    params: Params, champion: ChampionRef, release_dir: Path, run_dir: Path
) -> TrainResult:
    """The fine-tune step, here or on the GPU pool (``deploy.finetune_remote``)."""
    if not params.deploy.finetune_remote:
        return finetune(params, champion, release_dir, run_dir)
    return finetune_on_gpu_pool(params, champion, release_dir, run_dir)


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
    params: Params, champion: ChampionRef, release_dir: Path, run_dir: Path
) -> TrainResult:
    """Start the fine-tune flow on the GPU pool, wait for it, and copy its candidate here."""
    from prefect.deployments import run_deployment

    check_deployment_pool(params)
    log = run_logger()
    release_url = upload(release_dir, handoff_url(params, "releases", run_dir.name))
    out_url = handoff_url(params, "runs", run_dir.name)
    log.info(f"fine-tune on work pool {params.deploy.gpu_pool}: {release_url} -> {out_url}")
    run = run_deployment(
        params.deploy.finetune_deployment,
        parameters={
            "params": params.model_dump(mode="json", exclude={"root"}),
            "champion_version": champion.version,
            "champion_releases": champion.releases,
            "release_url": release_url,
            "out_url": out_url,
        },
        flow_run_name=f"finetune-{run_dir.name}",
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
    return result.model_copy(update={"model_dir": local})


def champion_here(params: Params, version: str | None, releases: list[str]) -> ChampionRef:
    """The champion on this node: the registered version from MLflow, or the base model."""
    if version is None:
        base = resolve_model(params.model.base, params.path(params.model.cache_dir))
        return ChampionRef(version=None, model_dir=Path(base), releases=[])
    return ChampionRef(
        version=version, model_dir=model_version_dir(params, version), releases=releases
    )


@flow(name="forgetless-finetune", log_prints=True)
def finetune_flow(
    params: dict[str, Any],
    champion_version: str | None,
    champion_releases: list[str],
    release_url: str,
    out_url: str,
) -> str:
    """Fine-tune on this worker (the GPU pool): the release from ``release_url``, the champion
    from the registry; the candidate and its ``train_result.json`` go to ``out_url``."""
    log = run_logger()
    config = Params.model_validate(params | {"root": str(Path.cwd())})
    # this node's own folder for the run (a retry of the flow run resumes from its checkpoints)
    work = Path(tempfile.gettempdir()) / "forgetless-gpu-runs" / out_url.rstrip("/").split("/")[-1]
    release = download(release_url, work / "release")
    champion = champion_here(config, champion_version, champion_releases)
    log.info(f"fine-tune {config.train.strategy} from champion {champion_version or 'base'}")
    result = finetune(config, champion, release, work)
    upload(result.model_dir, f"{out_url}/{CANDIDATE}")
    fs, path = url_to_fs(f"{out_url}/{FILES['finetune']}")
    fs.pipe_file(path, result.model_dump_json().encode())  # last: the candidate is complete
    shutil.rmtree(work, ignore_errors=True)
    return out_url
