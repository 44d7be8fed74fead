"""MLflow helpers shared by the steps: the client, the champion, and fetching a model version."""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request
from pathlib import Path

from flows.config import Params
from flows.model_source import resolve_model
from flows.records import ChampionRef

CHAMPION = "champion"


class TrackingUnavailable(RuntimeError):
    """The MLflow tracking server cannot be reached; nothing was registered or promoted."""


def client(params: Params):
    import mlflow
    from mlflow import MlflowClient

    uri = params.tracking_uri
    if uri.startswith(("http://", "https://")):
        check_server(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    c = MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        c.search_experiments(max_results=1)
    except Exception as exc:  # the error types differ by backend; all mean "cannot reach it"
        raise TrackingUnavailable(
            f"MLflow tracking store {uri} is unreachable ({type(exc).__name__}: {exc}); "
            "nothing was registered or promoted — start the server or fix tracking.uri"
        ) from exc
    return c


def check_server(uri: str, timeout: float = 10.0) -> None:
    """Fail fast, with a clear message, when a tracking server does not answer its health check
    (MLflow's own client would retry for minutes first)."""
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as response:
            if response.status == 200:
                return
            problem = f"HTTP {response.status}"
    except (OSError, urllib.error.URLError) as exc:
        problem = f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"
    raise TrackingUnavailable(
        f"MLflow tracking server {uri} is unreachable ({problem}); nothing was registered or "
        "promoted — start the server or fix tracking.uri in params.yaml"
    )


def champion_version(params: Params) -> str | None:
    """The version the ``champion`` alias points at, or None."""
    from mlflow.exceptions import MlflowException

    c = client(params)
    try:
        return str(c.get_model_version_by_alias(params.model.registered_name, CHAMPION).version)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def model_version_dir(params: Params, version: str) -> Path:
    """A local folder with the weights of a registered version (downloaded once, cached)."""
    import mlflow

    cache = params.workspace_dir / "cache" / "models" / f"{params.model.registered_name}-v{version}"
    if not (cache / "config.json").exists():
        tmp = cache.with_name(cache.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        uri = f"models:/{params.model.registered_name}/{version}"
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp)))
        weights = next(local.rglob("config.json")).parent  # the model_dir artifact inside
        shutil.rmtree(cache, ignore_errors=True)
        weights.rename(cache)
        shutil.rmtree(tmp, ignore_errors=True)
    return cache


def current_champion(params: Params) -> ChampionRef:
    """The champion now: a registered version, or the base model when none is promoted yet."""
    version = champion_version(params)
    if version is None:
        base = resolve_model(params.model.base, params.path(params.model.cache_dir))
        return ChampionRef(version=None, model_dir=Path(base), releases=[])
    mv = client(params).get_model_version(params.model.registered_name, version)
    releases = json.loads(mv.tags.get("releases_learned", "[]"))
    return ChampionRef(
        version=version, model_dir=model_version_dir(params, version), releases=releases
    )
