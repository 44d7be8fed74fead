"""Step 7, register: one MLflow run with everything about the retrain, and a model version.

The run holds the params, the per-step training loss, the release's DVC hash and commits, the
probe, eval and training sets as dataset inputs, the scores, retention and the gate report. The
model version (a pyfunc whose artifact is the candidate folder) is tagged with the gate decision
and the releases it has learned; it is registered whether or not the gate passed.

Registering is idempotent: the run and the version carry an ``idempotency_key`` (a hash of the
release's DVC hash, the champion it started from, the strategy and its options, the training
seed, the candidate's weights and the gate decision on it), and ``register`` first looks for a
version with that key and returns it. A retried task, a ``forgetless resume`` or a re-run that
trained the same candidate from the same champion never registers it twice; the same weights
judged by other gate thresholds are another registration (the version carries its verdict).
Two registrations of the same candidate that race (both looked before either created) keep the
oldest version and delete the younger (``keep_oldest``).
A new version is created with all its tags at once, ``promotion=pending`` among them, which the
promote step replaces: a retrain that stops between the two leaves a version tagged ``pending``
and the champion as it was.

The weights are then kept once: the run folder's candidate gives way to a pointer to the
registered copy (``release_run_weights``), and the retention policy runs
(``flows/registry/prune.py``). With ``registry.weights: adapter`` the candidate folder, and so the
registered artifact, is a LoRA adapter with a reference to its parent (``flows/registry/serving.py``).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import time
import warnings
from pathlib import Path

import pandas as pd
from pydantic import BaseModel, ConfigDict

import cf_strategies
from flows.core.config import EvaluateConfig, ModelConfig, ModelStore, Params, TrainConfig
from flows.core.data import read_jsonl
from flows.core.records import (
    EvalReport,
    GateDecision,
    ProbeSet,
    Registration,
    TrainResult,
    VersionedRelease,
)
from flows.registry import prune, serving
from flows.registry.tracking import (
    PENDING,
    candidate_dir,
    candidate_pointer,
    client,
    experiment_id,
    read_candidate_pointer,
    tracking_errors,
    version_store,
)

# What flows/registry/serving.py, the registered model's whole code, imports (pandas comes with mlflow).
PIP_REQUIREMENTS = ["torch==2.13.0", "transformers==5.24.0", "mlflow==3.17.2"]
# A model that keeps parameters per task also runs cf_strategies (logged with it) and peft.
TASK_REQUIREMENTS = ["peft==0.21.2", "accelerate==1.15.0", "pydantic>=2.7"]


# An adapter registered unmerged is merged onto its parents with peft when it loads.
ADAPTER_REQUIREMENTS = ["peft==0.21.2", "accelerate==1.15.0"]


def model_code(model_dir: Path) -> tuple[list[str] | None, list[str]]:
    """``code_paths`` and pip requirements of the registered model: ``cf_strategies`` and its
    dependencies only for a model served by task (``tasks.json`` in its folder), peft for an
    adapter (``parent.json``)."""
    if serving.tasks_spec(model_dir) is not None:
        return [str(Path(cf_strategies.__file__).parent)], PIP_REQUIREMENTS + TASK_REQUIREMENTS
    if (Path(model_dir) / serving.ADAPTER_PARENT).is_file():
        return None, PIP_REQUIREMENTS + ADAPTER_REQUIREMENTS
    return None, PIP_REQUIREMENTS


def weights_tags(model_dir: Path) -> dict[str, str]:
    """How a version's weights are stored: ``weights_format`` merged or adapter, and for an
    adapter on a registered version that version (``parent_version``, which the retention
    policy then keeps)."""
    link_file = Path(model_dir) / serving.ADAPTER_PARENT
    if not link_file.is_file():
        return {"weights_format": "merged"}
    parent = json.loads(link_file.read_text())["parent"]
    tags = {"weights_format": "adapter", "parent": serving.describe(parent)}
    if parent.get("kind") == "registered":
        tags[prune.PARENT_TAG] = str(parent["version"])
    return tags


def code_commit() -> str:
    """The commit of the Forgetless code that ran, or "unknown" outside a git checkout."""
    here = Path(__file__).resolve().parent
    done = subprocess.run(
        ["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True
    )
    return done.stdout.strip() or "unknown"


# Kept whole, as JSON: their keys are strategy specs ("lwf+replay"), not valid param names.
AS_JSON = {"train.candidates"}


def flat_params(data: dict) -> dict[str, str]:
    """A config as MLflow params: nested keys dotted (``train.lora.r``), values as JSON text."""
    out: dict[str, str] = {}

    def walk(prefix: str, node) -> None:
        if isinstance(node, dict) and node and prefix not in AS_JSON:
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            out[prefix] = json.dumps(node) if not isinstance(node, str) else node

    walk("", data)
    return out


class RegisterStep(BaseModel):
    """What the register step reads: the model store, the sections the registered model and its
    idempotency key are made of, and the run's whole configuration as the MLflow params it logs
    (``flat_params``), resolved from ``params.yaml`` once (:meth:`from_params`)."""

    model_config = ConfigDict(frozen=True)

    store: ModelStore
    model: ModelConfig
    train: TrainConfig
    evaluate: EvaluateConfig
    logged_params: dict[str, str]

    @classmethod
    def from_params(cls, params: Params) -> RegisterStep:
        return cls(
            store=params.model_store,
            model=params.model,
            train=params.train,
            evaluate=params.evaluate,
            logged_params=flat_params(params.model_dump(mode="json", exclude={"root"})),
        )


def _dataset(path: Path, name: str, digest: str | None = None):
    import mlflow

    df = pd.DataFrame([r for _, r in read_jsonl(path)]).astype(str)
    with warnings.catch_warnings():  # a local path matches two equivalent source types
        warnings.filterwarnings("ignore", message="The specified dataset source")
        return mlflow.data.from_pandas(df, source=str(path), name=name, digest=digest)


IDEMPOTENCY_TAG = "idempotency_key"


def weights_hash(model_dir: Path) -> str:
    """sha256 of a model folder's weights (``*.safetensors``; every file when there are none):
    relative paths and contents, in path order."""
    model_dir = Path(model_dir)
    files = sorted(model_dir.rglob("*.safetensors")) or sorted(
        f for f in model_dir.rglob("*") if f.is_file()
    )
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.relative_to(model_dir).as_posix().encode() + b"\0")
        with f.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def candidate_weights_hash(model_dir: Path) -> str:
    """``weights_hash`` of a run's candidate, read from its pointer once the run folder's copy
    gave way to the registered one (``release_run_weights``)."""
    pointer = read_candidate_pointer(model_dir)
    return pointer["weights_sha256"] if pointer else weights_hash(model_dir)


def idempotency_key(
    step: RegisterStep,
    release: VersionedRelease,
    probe_set: ProbeSet,
    train: TrainResult,
    decision: GateDecision,
    weights: str | None = None,
) -> str:
    """What makes a registration the same one: the release's content, the champion it started
    from, the strategy with its options, the training seed, the weights it ended with (their
    hash ``weights``, computed when not given), and the gate decision the version is tagged
    with (each check: value, threshold, verdict)."""
    strategies = cf_strategies.validate_spec(train.strategy)
    payload = {
        "release_dvc_hash": release.dvc_hash,
        "champion": probe_set.champion.version or "base",
        "strategy": train.strategy,
        "strategy_params": {n: step.train.strategy_params.get(n, {}) for n in strategies},
        "train_seed": step.train.seed,
        "weights": weights or candidate_weights_hash(train.model_dir),
        "gate": decision.model_dump(mode="json"),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def registered_version(c, name: str, key: str):
    """The oldest version of ``name`` tagged with idempotency key ``key``, or None."""
    found = c.search_model_versions(f"name = '{name}' and tags.{IDEMPOTENCY_TAG} = '{key}'")
    return min(found, key=lambda mv: int(mv.version), default=None)


def register(
    step: RegisterStep,
    release: VersionedRelease,
    probe_set: ProbeSet,
    train: TrainResult,
    report: EvalReport,
    decision: GateDecision,
    run_dir: Path,
) -> Registration:
    c = client(step.store)
    name = step.store.model_name
    weights = candidate_weights_hash(train.model_dir)
    key = idempotency_key(step, release, probe_set, train, decision, weights)
    with tracking_errors(
        step.store,
        f"registering {name} (idempotency key {key[:12]})",
        "nothing was promoted; a version already created is found again by its key",
    ):
        existing = registered_version(c, name, key)
        if existing is not None:
            done = Registration(
                name=name, version=str(existing.version), run_id=existing.run_id or ""
            )
        else:
            mine = _register_new(step, release, probe_set, train, report, decision, run_dir, key)
            done = keep_oldest(c, mine, key)
        release_run_weights(step, train, run_dir, done, weights)
    prune.apply_after_registration(step.store)
    return done


def folder_files(folder: Path) -> dict[str, int]:
    """Every file under ``folder``: relative path -> size in bytes."""
    return {
        f.relative_to(folder).as_posix(): f.stat().st_size for f in folder.rglob("*") if f.is_file()
    }


def release_run_weights(
    step: RegisterStep, train: TrainResult, run_dir: Path, registration: Registration, weights: str
) -> Path | None:
    """Keep the candidate's weights once: after its registration the run folder's copy gives
    way to a pointer, ``candidate_model.json`` (the version, its model URI, the weights' hash
    that keeps the idempotency key, their dtype and size). Only a folder inside ``run_dir`` (one
    this run trained) is released, and only when the registered copy holds the same files with
    the same sizes; anything that needs the weights later reads the registered copy
    (``tracking.candidate_dir``). Returns the pointer, or None when the folder stays."""
    model_dir = Path(train.model_dir)
    if not model_dir.is_dir() or not model_dir.resolve().is_relative_to(Path(run_dir).resolve()):
        return None
    pointer = candidate_pointer(model_dir)
    if pointer.is_file():  # released before, and stopped while removing the folder
        shutil.rmtree(model_dir)
        return pointer
    repo, path = version_store(step.store, registration.version)
    files = folder_files(model_dir)
    if prune.artifact_files(repo, path) != files:
        warnings.warn(
            f"{registration.name} v{registration.version} does not hold the same files as "
            f"{model_dir}; the run folder keeps its copy of the weights",
            stacklevel=2,
        )
        return None
    record = {
        "registered_model": registration.name,
        "version": registration.version,
        "model_uri": f"models:/{registration.name}/{registration.version}",
        "run_id": registration.run_id,
        "weights_sha256": weights,
        "weights_dtype": train.weights_dtype,
        "bytes": sum(files.values()),
        "note": "the weights are the registered version's; this run's copy was removed after "
        "registration (flows/steps/register.py: release_run_weights)",
    }
    tmp = pointer.with_name(pointer.name + ".partial")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(pointer)  # the pointer first: a crash below leaves it beside a partial folder
    shutil.rmtree(model_dir)
    return pointer


def log_input(dataset, context: str, attempts: int = 3) -> None:
    """``mlflow.log_input``, again when a concurrent run created the same dataset first: the
    tracking store gets-or-creates a dataset in two statements, so two runs logging one dataset
    at once can hit its unique constraint (SQLite and PostgreSQL alike); the second try finds
    the row and links to it."""
    import mlflow
    from mlflow.exceptions import MlflowException

    for attempt in range(attempts):
        try:
            mlflow.log_input(dataset, context=context)
            return
        except MlflowException as err:
            duplicate = any(s in str(err).lower() for s in ("unique constraint", "duplicate key"))
            if not duplicate or attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1))


def keep_oldest(c, mine: Registration, key: str) -> Registration:
    """Two registrations of one candidate that raced (each looked for the key before the other
    created its version) both end here and agree: the oldest version with the key is the
    registration, and a younger one, ours, is deleted; its run stays, tagged ``duplicate_of``.
    No lock is needed: every racer converges on the same version."""
    oldest = registered_version(c, mine.name, key)
    if oldest is None or str(oldest.version) == mine.version:
        return mine
    c.set_tag(mine.run_id, "duplicate_of", f"{mine.name}/{oldest.version}")
    c.delete_model_version(mine.name, mine.version)
    return Registration(name=mine.name, version=str(oldest.version), run_id=oldest.run_id or "")


def _register_new(
    step: RegisterStep,
    release: VersionedRelease,
    probe_set: ProbeSet,
    train: TrainResult,
    report: EvalReport,
    decision: GateDecision,
    run_dir: Path,
    key: str,
) -> Registration:
    """One MLflow run and one model version, created with every tag at once."""
    import mlflow

    name = step.store.model_name
    mlflow.set_experiment(experiment_id=experiment_id(step.store))
    verdict = "passed" if decision.passed else "failed"
    with mlflow.start_run(run_name=f"retrain-{release.name}", tags={IDEMPOTENCY_TAG: key}) as run:
        mlflow.log_params(step.logged_params)
        for h in train.log_history:
            mlflow.log_metric("train_loss", h["loss"], step=int(h["step"]))
        metrics = {f"probe_score.{t}": s for t, s in report.scores.items()}
        metrics |= {f"baseline.{t}": s for t, s in report.baseline.items()}
        metrics |= {f"retention.{t}": r for t, r in report.retention.items()}
        for prefix, by_task in (("", report.tasks), ("anchor_", report.anchored)):
            for t, stats in by_task.items():
                metrics |= {
                    f"{prefix}retention_kept.{t}": stats.value,
                    f"{prefix}retention_low.{t}": stats.low,
                    f"{prefix}known_items.{t}": stats.known,
                    f"{prefix}lost_items.{t}": stats.lost,
                    f"{prefix}gained_items.{t}": stats.gained,
                }
        if report.new_task_interval:
            metrics["new_task_score_low"], metrics["new_task_score_high"] = report.new_task_interval
        metrics |= {
            "new_task_score": report.new_task_score,
            "new_task_baseline": report.new_task_baseline,
            "min_retention": min(report.retention.values(), default=1.0),
            # the gated statistics: vs the champion and vs each task's anchor
            "min_kept": min((t.value for t in report.tasks.values()), default=1.0),
            "min_kept_vs_anchor": min((t.value for t in report.anchored.values()), default=1.0),
            "train_seconds": train.train_seconds,
            "eval_seconds": report.eval_seconds,
        }
        mlflow.log_metrics(metrics)
        mlflow.set_tags(
            {
                "release": release.name,
                "release_dvc_hash": release.dvc_hash,
                "workspace_git_commit": release.git_commit,
                "code_git_commit": code_commit(),
                "probe_set_dvc_hash": probe_set.dvc_hash,
                "champion_at_start": probe_set.champion.version or "base",
                "strategy": train.strategy,
                "gate": verdict,
            }
        )
        log_input(
            _dataset(probe_set.path, "probe_test", probe_set.dvc_hash[:8]), context="probe-test"
        )
        if probe_set.dev_path:
            log_input(_dataset(probe_set.dev_path, "probe_dev"), context="probe-dev")
        log_input(_dataset(release.path / "eval.jsonl", f"{release.name}-eval"), context="eval")
        log_input(
            _dataset(release.path / "train.jsonl", f"{release.name}-train"), context="training"
        )
        mlflow.log_dict(decision.model_dump(mode="json"), "gate_report.json")
        mlflow.log_dict(report.model_dump(mode="json"), "eval_report.json")
        for f in sorted(run_dir.glob("*/*.jsonl")):
            mlflow.log_artifact(str(f), artifact_path=f"outputs/{f.parent.name}")
        model_dir = candidate_dir(step.store, train.model_dir)  # the registered copy, if released
        code_paths, requirements = model_code(model_dir)
        info = mlflow.pyfunc.log_model(
            name="model",
            code_paths=code_paths,
            python_model=serving.__file__,
            artifacts={"model_dir": str(model_dir)},
            model_config={
                "use_chat_template": step.model.use_chat_template,
                "trust_remote_code": step.model.trust_remote_code,
                "max_new_tokens": step.evaluate.max_new_tokens,
                "batch_size": step.evaluate.batch_size,
            },
            signature=serving.signature(step.evaluate.max_new_tokens),
            input_example=serving.INPUT_EXAMPLE,
            pip_requirements=requirements,
        )
    learned = probe_set.champion.releases + [release.name]
    mv = mlflow.register_model(
        info.model_uri,
        name,
        tags={
            IDEMPOTENCY_TAG: key,
            "promotion": PENDING,
            "gate": verdict,
            "gate_reasons": "; ".join(decision.reasons),
            "release": release.name,
            "releases_learned": json.dumps(learned),
            "learned_by": json.dumps(probe_set.champion.learned_by),  # and this one: its release
            "release_dvc_hash": release.dvc_hash,
            "champion_at_start": probe_set.champion.version or "base",
            **weights_tags(model_dir),
        },
    )
    return Registration(name=name, version=str(mv.version), run_id=run.info.run_id)


def log_artifact(store: ModelStore, run_id: str, path: Path, folder: str = "plots") -> None:
    """Attach a file made after registration (the accuracy heatmap) to the retrain's run."""
    client(store).log_artifact(run_id, str(path), folder)


def log_candidates(store: ModelStore, parent_run_id: str, results: list) -> None:
    """One child run per tournament candidate under the retrain's run: its strategy and
    options, dev scores and whether it won (``flows/tournament.CandidateResult``)."""
    c = client(store)
    for r in results:
        run = c.create_run(
            experiment_id(store),
            run_name=r.candidate.label,
            tags={
                "mlflow.parentRunId": parent_run_id,
                "strategy": r.candidate.strategy,
                "winner": str(r.winner).lower(),
                "eligible_on_dev": str(r.eligible).lower(),
                "note": r.note,
            },
        )
        rid = run.info.run_id
        c.log_param(rid, "train.strategy", r.candidate.strategy)
        for name, options in r.candidate.strategy_params.items():
            for key, value in options.items():
                c.log_param(rid, f"train.strategy_params.{name}.{key}", json.dumps(value))
        metrics = {f"dev.retention.{t}": v for t, v in r.dev.retention.items()}
        metrics |= {
            "dev.new_task_score": r.dev.new_task_score,
            "dev.min_retention": r.min_retention,
            "train_seconds": r.trained.train_seconds,
        }
        for key, value in metrics.items():
            c.log_metric(rid, key, value)
        c.set_terminated(rid)
