"""Pruning, the registry's retention policy for weights: the weights of a version that failed
the gate are removed once ``registry.keep_failed_weights`` newer versions were registered after it.

What goes: the weight files (``*.safetensors``: the model's and its strategy state's) of the
version's ``model_dir`` artifact in the MLflow artifact store, and any local copy of them in
``workspace/cache/models``. What stays: the version record (tagged ``weights=removed``, with
``weights_removed`` saying when, why and by which setting), its MLflow run with params, metrics,
gate and eval reports, datasets and per-item outputs, and the rest of the model folder (config,
tokenizer, ``WEIGHTS_REMOVED.json``, which makes loading it fail with the same message).

Never removed: the champion's weights (or any version an alias points at), a version that passed
the gate, a version still ``promotion=pending``, a version without a gate verdict, any version that
has held the champion alias (``previous_champion``: a rollback can return to it), and a version
another one references as the parent of its adapter (``registry.weights: adapter``).

It runs after each registration (``flows/steps/register.py``) and as ``forgetless prune [--dry-run]``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from flows.core.config import ModelStore
from flows.registry import serving
from flows.registry.tracking import (
    PENDING,
    WEIGHTS_REMOVED_TAG,
    WEIGHTS_TAG,
    client,
    version_store,
)

PARENT_TAG = "parent_version"  # on a version registered as an adapter: the version it builds on
WEIGHT_SUFFIX = ".safetensors"


@dataclass(frozen=True)
class Candidate:
    """A version the policy looked at: removed (or to be, in a dry run), or kept and why."""

    version: str
    release: str
    newer: int  # versions registered after it
    remove: bool
    reason: str
    bytes: int = 0  # of weights removed (or to be)


def artifact_files(repo, path: str) -> dict[str, int]:
    """Every file under ``path`` of an artifact repository: its path relative to ``path`` ->
    size in bytes."""
    out: dict[str, int] = {}
    folders = [path]
    while folders:
        for info in repo.list_artifacts(folders.pop()):
            if info.is_dir:
                folders.append(info.path)
            else:
                out[info.path[len(path) :].lstrip("/")] = info.file_size or 0
    return out


def protected(mv, aliased: set[str], parents: set[str]) -> str | None:
    """Why a version's weights must stay, or None when the policy may remove them."""
    tags = mv.tags
    version = str(mv.version)
    if tags.get(WEIGHTS_TAG) == "removed":
        return "weights already removed"
    if version in aliased:
        return "an alias points at it (champion)"
    if tags.get("gate") != "failed":
        return f"gate {tags.get('gate', 'unknown')}"
    if tags.get("promotion", PENDING) == PENDING:
        return "promotion pending"
    if "previous_champion" in tags or any(k.startswith("forced_promotion.") for k in tags):
        return "it has been champion (a rollback can return to it)"
    if version in parents:
        return "an adapter version builds on it"
    return None


def plan(store: ModelStore, keep: int) -> list[Candidate]:
    """Every registered version with the policy's decision on it, oldest first."""
    from flows.registry.history import all_versions

    c = client(store)
    name = store.model_name
    versions = all_versions(c, name)
    if not versions:
        return []
    aliased = {str(v) for v in c.get_registered_model(name).aliases.values()}
    parents = {
        mv.tags[PARENT_TAG]
        for mv in versions
        if PARENT_TAG in mv.tags and mv.tags.get(WEIGHTS_TAG) != "removed"
    }
    out = []
    for mv in versions:
        newer = sum(int(o.version) > int(mv.version) for o in versions)
        why = protected(mv, aliased, parents)
        if why is None and newer < keep:
            why = f"failed, but only {newer} newer version(s) of the {keep} the policy waits for"
        out.append(
            Candidate(
                version=str(mv.version),
                release=mv.tags.get("release", ""),
                newer=newer,
                remove=why is None,
                reason=why or f"failed the gate; {newer} newer version(s) registered",
            )
        )
    return out


def removal_message(store: ModelStore, version: str, release: str, keep: int, newer: int) -> str:
    """What loading a version whose weights were removed says."""
    name = store.model_name
    day = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"{name} v{version} has no weights: the retention policy removed them on {day} "
        f"(registry.keep_failed_weights: {keep} in params.yaml; it failed the gate and {newer} "
        f"newer versions were registered). Its MLflow run, metrics, reports and this version "
        f"record remain; to have a model for release {release or '?'} again, retrain on it"
    )


def remove_weights(store: ModelStore, version: str, message: str) -> int:
    """Remove a version's weight files from the artifact store (the ``WEIGHTS_REMOVED.json``
    marker first, the tag last, so a crash half-way is finished by the next run) and any local
    cached copy; returns the bytes removed."""
    name = store.model_name
    repo, path = version_store(store, version)
    weights = {f: n for f, n in artifact_files(repo, path).items() if f.endswith(WEIGHT_SUFFIX)}
    with tempfile.TemporaryDirectory() as tmp:
        marker = Path(tmp) / serving.WEIGHTS_REMOVED
        marker.write_text(json.dumps({"message": message, "files": sorted(weights)}, indent=1))
        repo.log_artifact(str(marker), path)
    for f in sorted(weights):
        repo.delete_artifacts(f"{path}/{f}")
    cached = store.workspace / "cache" / "models" / f"{name}-v{version}"
    shutil.rmtree(cached, ignore_errors=True)
    c = client(store)
    c.set_model_version_tag(name, version, WEIGHTS_REMOVED_TAG, message)
    c.set_model_version_tag(name, version, WEIGHTS_TAG, "removed")
    return sum(weights.values())


def prune(store: ModelStore, keep: int | None = None, dry_run: bool = False) -> list[Candidate]:
    """Apply the policy (``keep`` newer versions, default ``registry.keep_failed_weights``):
    remove the weights it allows, or with ``dry_run`` only say which and how many bytes.
    Returns every version with its decision; ``keep`` None with the policy off changes nothing."""
    keep = store.keep_failed_weights if keep is None else keep
    if keep is None:
        return []
    decided = []
    for cand in plan(store, keep):
        if cand.remove:
            if dry_run:
                repo, path = version_store(store, cand.version)
                files = artifact_files(repo, path)
                size = sum(n for f, n in files.items() if f.endswith(WEIGHT_SUFFIX))
            else:
                message = removal_message(store, cand.version, cand.release, keep, cand.newer)
                size = remove_weights(store, cand.version, message)
            cand = Candidate(**{**cand.__dict__, "bytes": size})
        decided.append(cand)
    return decided


def apply_after_registration(store: ModelStore) -> list[Candidate]:
    """The policy after a registration; a failure is a warning, never a failed retrain (the
    registration is done; ``forgetless prune`` applies the policy later)."""
    if store.keep_failed_weights is None:
        return []
    try:
        return prune(store)
    except Exception as exc:  # housekeeping: whatever went wrong, the version stands
        warnings.warn(
            f"retention policy not applied ({type(exc).__name__}: {exc}); "
            "`forgetless prune` applies it later",
            stacklevel=2,
        )
        return []
