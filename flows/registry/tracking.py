"""MLflow helpers shared by the steps: the client, the experiment, the champion, and fetching a
model version; what happens when the tracking server does not answer.

Retry policy for a tracking server (``http(s)://``): its health check is tried again after each
of ``RETRY_DELAYS`` (2, 4, 8 s: four attempts over about 14 s) before a step starts talking to
it, and every MLflow request is retried by MLflow itself ``HTTP_RETRIES`` times with a backoff
of ``HTTP_BACKOFF_FACTOR`` × 1, 2, 4 s (``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` and
``MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR`` in the environment take precedence). Then the step fails
with ``TrackingUnavailable``, naming the server and what to do; the Prefect flow retries the
register and promote tasks on it, and ``forgetless resume RUN_DIR`` finishes a run later.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from flows.core.config import ModelStore
from flows.core.records import ChampionRef
from flows.registry.model_source import resolve_model

CHAMPION = "champion"
BASE = "base"  # ``previous_champion`` of the first champion: the base model it replaced
PENDING = "pending"  # a new version's ``promotion`` tag until the promote step decides

RETRY_DELAYS = (2.0, 4.0, 8.0)  # seconds before each further health check of the server
HTTP_RETRIES = 3  # MLflow's own retries of one request (its default, 7, takes ~4 minutes)
HTTP_BACKOFF_FACTOR = 1  # ... after 1, 2, 4 s

RESUME_HINT = "once it answers, `forgetless resume RUN_DIR` finishes a retrain stopped by this"


class TrackingUnavailable(RuntimeError):
    """The MLflow tracking server cannot be reached; the message says what the step left done."""


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def client(store: ModelStore):
    import mlflow
    from mlflow import MlflowClient

    uri = store.uri
    if is_server(uri):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(HTTP_RETRIES))
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", str(HTTP_BACKOFF_FACTOR))
        check_server(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    c = MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        c.search_experiments(max_results=1)
    except Exception as exc:  # the error types differ by backend; all mean "cannot reach it"
        raise TrackingUnavailable(
            f"MLflow tracking store {uri} is unreachable ({type(exc).__name__}: {exc}); "
            "nothing was registered or promoted by this step — start the server or fix "
            "tracking.uri; " + RESUME_HINT
        ) from exc
    return c


def server_problem(uri: str, timeout: float = 10.0) -> str | None:
    """None when the tracking server answers its health check, else what went wrong."""
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as response:
            if response.status == 200:
                return None
            return f"HTTP {response.status}"
    except (OSError, urllib.error.URLError) as exc:
        return f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"


def check_server(uri: str, timeout: float = 10.0) -> None:
    """Wait for a tracking server to answer its health check, trying again after each of
    ``RETRY_DELAYS``; then fail with a clear message (MLflow's own client would retry every
    request for minutes first)."""
    start = time.monotonic()
    for delay in (*RETRY_DELAYS, None):
        problem = server_problem(uri, timeout)
        if problem is None:
            return
        if delay is not None:
            time.sleep(delay)
    raise TrackingUnavailable(
        f"MLflow tracking server {uri} is unreachable ({problem}; {len(RETRY_DELAYS) + 1} "
        f"attempts over {time.monotonic() - start:.0f} s); nothing was registered or promoted "
        "by this step — start the server or fix tracking.uri in params.yaml; " + RESUME_HINT
    )


@contextmanager
def tracking_errors(store: ModelStore, doing: str, left: str) -> Iterator[None]:
    """Turn the loss of the tracking server in the middle of a step into ``TrackingUnavailable``
    (``doing``: what the step was doing; ``left``: what that leaves in the registry). An error
    while the server still answers is a real one and passes through unchanged."""
    try:
        yield
    except TrackingUnavailable:
        raise
    except Exception as exc:
        uri = store.uri
        problem = server_problem(uri, timeout=5.0) if is_server(uri) else None
        if problem is None:
            raise
        raise TrackingUnavailable(
            f"MLflow tracking server {uri} stopped answering while {doing} ({problem}; the "
            f"request failed with {type(exc).__name__} after MLflow's retries); {left} — start "
            "the server or fix tracking.uri in params.yaml; " + RESUME_HINT
        ) from exc


def artifact_location(store: ModelStore) -> str | None:
    """Where a new experiment keeps its artifacts (a file URI): ``mlartifacts/`` beside a SQLite
    store (the default store: ``<workspace>/mlartifacts``), in the workspace for another local
    store; None for a tracking server, which keeps its own artifact root."""
    uri = store.uri
    if uri.startswith(("http://", "https://", "databricks")):
        return None
    db = uri.removeprefix("sqlite:///") if uri.startswith("sqlite:///") else ""
    folder = Path(db).parent if db else store.workspace
    return (folder / "mlartifacts").resolve().as_uri()


def experiment_id(store: ModelStore) -> str:
    """The id of ``tracking.experiment``, created on first use with its artifacts at
    ``artifact_location`` (MLflow's own default is ``./mlruns`` of whatever folder runs it)."""
    from mlflow.exceptions import MlflowException

    c = client(store)
    name = store.experiment
    experiment = c.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return c.create_experiment(name, artifact_location=artifact_location(store))
    except MlflowException as exc:  # another retrain created it meanwhile
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return c.get_experiment_by_name(name).experiment_id


def champion_version(store: ModelStore) -> str | None:
    """The version the ``champion`` alias points at, or None."""
    from mlflow.exceptions import MlflowException

    c = client(store)
    try:
        return str(c.get_model_version_by_alias(store.model_name, CHAMPION).version)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


WEIGHTS_TAG = "weights"  # "removed" once the retention policy removed a version's weights
WEIGHTS_REMOVED_TAG = "weights_removed"  # ... and what it did, when and why (its message)


def version_store(store: ModelStore, version: str):
    """The artifact repository holding a registered version's pyfunc model, and the path in it
    of the version's weights folder (the ``model_dir`` artifact, e.g. ``artifacts/candidate_model``)."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    from flows.registry import serving

    uri = store.uri
    location = client(store).get_model_version_download_uri(store.model_name, version)
    repo = get_artifact_repository(location, tracking_uri=uri, registry_uri=uri)
    with tempfile.TemporaryDirectory() as tmp:
        mlmodel = Path(repo.download_artifacts("MLmodel", tmp))
        return repo, serving.model_dir_artifact(mlmodel.parent)


def local_folder(repo) -> Path | None:
    """The folder of an artifact repository on this machine's file system, or None (remote)."""
    from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

    return Path(repo.artifact_dir) if isinstance(repo, LocalArtifactRepository) else None


def check_weights_kept(store: ModelStore, version: str) -> None:
    """Refuse a version whose weights the retention policy removed, in the policy's words."""
    from flows.registry import serving

    mv = client(store).get_model_version(store.model_name, version)
    if mv.tags.get(WEIGHTS_TAG) == "removed":
        raise serving.WeightsRemoved(mv.tags.get(WEIGHTS_REMOVED_TAG, "weights removed"))


def model_version_dir(store: ModelStore, version: str) -> Path:
    """A local folder with the weights of a registered version. With the artifact store on this
    machine (the default, ``mlartifacts/`` beside the SQLite store) it is the store's own
    folder, read in place: nothing is copied. From a remote store the weights folder is
    downloaded once into ``workspace/cache/models/<name>-v<N>``. A version whose weights the
    retention policy removed is an error that says so (``flows/registry/prune.py``)."""
    check_weights_kept(store, version)
    repo, weights = version_store(store, version)
    folder = local_folder(repo)
    if folder is not None:
        return folder / weights
    cache = store.workspace / "cache" / "models" / f"{store.model_name}-v{version}"
    if not cache.is_dir():
        tmp = cache.with_name(cache.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        local = Path(repo.download_artifacts(weights, str(tmp)))
        local.rename(cache)  # atomic: a download cut short never stands as the cache
        shutil.rmtree(tmp, ignore_errors=True)
    return cache


# After a registration the run folder's candidate gives way to a pointer (``register.py``):
# ``candidate_model.json`` beside where ``candidate_model/`` was, naming the registered version.
def candidate_pointer(model_dir: Path) -> Path:
    """Where the pointer of a run's candidate folder is written: ``<folder>.json`` beside it."""
    model_dir = Path(model_dir)
    return model_dir.with_name(model_dir.name + ".json")


def read_candidate_pointer(model_dir: Path) -> dict | None:
    """The pointer left for a candidate folder whose weights are the registered copy, or None."""
    pointer = candidate_pointer(model_dir)
    return json.loads(pointer.read_text()) if pointer.is_file() else None


def candidate_dir(store: ModelStore, model_dir: Path) -> Path:
    """A run's candidate folder, or, once registered, the registered version's weights folder
    (what ``evaluate`` reads when ``forgetless resume`` runs it again)."""
    pointer = read_candidate_pointer(model_dir)
    if pointer is None:
        return Path(model_dir)
    return model_version_dir(store, pointer["version"])


def base_model_dir(store: ModelStore) -> Path:
    """The folder of the base model, the champion before any promotion (the embedded model is
    converted into ``model.cache_dir`` on first use; a hub id is downloaded)."""
    return Path(resolve_model(store.base_model, store.model_cache))


def current_champion(store: ModelStore) -> ChampionRef:
    """The champion now: a registered version, or the base model when none is promoted yet."""
    version = champion_version(store)
    if version is None:
        return ChampionRef(version=None, model_dir=base_model_dir(store), releases=[])
    mv = client(store).get_model_version(store.model_name, version)
    releases = json.loads(mv.tags.get("releases_learned", "[]"))
    # the version that learned each release: the anchor its retention is measured from
    learned_by = json.loads(mv.tags.get("learned_by", "{}")) | {mv.tags.get("release"): version}
    return ChampionRef(
        version=version,
        model_dir=model_version_dir(store, version),
        releases=releases,
        learned_by={r: v for r, v in learned_by.items() if r in releases},
    )
