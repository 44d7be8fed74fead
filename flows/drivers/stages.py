"""The steps as DVC stages: ``forgetless step NAME`` runs one step, reading the records of the
steps before it from the run folder and writing its own (``dvc.yaml`` chains them).

The Prefect flow (``flows/drivers/retrain.py``) calls the same step functions and writes the same
record files, so a run folder looks alike whichever driver made it. ``resume`` (``forgetless
resume RUN_DIR``) finishes a run that stopped, e.g. on a tracking outage, by running the steps
whose records are missing, and then publishes the accuracy matrix and the report as the flow
does.
"""

from __future__ import annotations

import json
from pathlib import Path

from flows.core.config import Params, run_params
from flows.core.records import (
    FILES,
    STAGES,
    EvalReport,
    GateDecision,
    ProbeSet,
    Registration,
    TrainResult,
    ValidationReport,
    VersionedRelease,
)
from flows.production.landing import record_processed
from flows.production.remote_finetune import evaluate_where_trained, train_candidate
from flows.registry.tracking import candidate_dir, current_champion
from flows.steps.gate import gate
from flows.steps.probes import ProbesStep, create_probe_set
from flows.steps.promote import promote
from flows.steps.register import RegisterStep, register
from flows.steps.report import ReportStep, publish
from flows.steps.validate import ValidateStep, ValidationFailed, validate_step
from flows.steps.version import version_release


def run_stage(name: str, params: Params, run_dir: Path, release_dir: Path | None = None) -> None:
    def read(cls, stage: str):
        path = run_dir / FILES[stage]
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: run stage {stage!r} first")
        return cls.read(path)

    run_dir.mkdir(parents=True, exist_ok=True)
    out = run_dir / FILES[name]
    if name == "version":
        if release_dir is None:
            raise ValueError("stage 'version' needs a release folder (data.release)")
        record = version_release(
            release_dir,
            params.workspace_dir,
            params.dvc_remote,
            current_champion(params.model_store).releases,
        )
    elif name == "validate":
        versioned = read(VersionedRelease, "version")
        record = validate_step(
            ValidateStep.from_params(params), versioned.path, current_champion(params.model_store)
        )
        record.write(out)
        if not record.passed:
            raise ValidationFailed(record)
    elif name == "probes":
        versioned = read(VersionedRelease, "version")
        if not read(ValidationReport, "validate").passed:
            raise ValidationFailed(read(ValidationReport, "validate"))
        record = create_probe_set(
            ProbesStep.from_params(params),
            versioned.path,
            current_champion(params.model_store),
            run_dir,
        )
    elif name == "finetune":
        if params.train.candidates:
            raise ValueError(
                "train.candidates is set: a strategy tournament runs in the Prefect flow "
                "(forgetless run); the DVC stages train train.strategy alone"
            )
        probe_set = read(ProbeSet, "probes")
        versioned = read(VersionedRelease, "version")
        record = train_candidate(params, probe_set.champion, versioned.path, run_dir, probe_set)
    elif name == "evaluate":
        record = evaluate_where_trained(
            params,
            candidate_dir(
                params.model_store, read(TrainResult, "finetune").model_dir
            ),  # or registered copy
            read(ProbeSet, "probes"),
            read(VersionedRelease, "version").path,
            run_dir,
        )
        metrics = {"new_task_score": record.new_task_score} | {
            f"retention.{t}": r for t, r in record.retention.items()
        }
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    elif name == "gate":
        record = gate(read(EvalReport, "evaluate"), params.gate)
    elif name == "register":
        record = register(
            RegisterStep.from_params(params),
            read(VersionedRelease, "version"),
            read(ProbeSet, "probes"),
            read(TrainResult, "finetune"),
            read(EvalReport, "evaluate"),
            read(GateDecision, "gate"),
            run_dir,
        )
    elif name == "promote":
        record = promote(
            params.model_store,
            read(Registration, "register"),
            read(GateDecision, "gate"),
            read(ProbeSet, "probes").champion.version,
        )
        record.write(out)
        publish(
            ReportStep.from_params(params), run_dir
        )  # the accuracy matrix and the report, as the flow does
        if params.data.landing:  # processed: a scheduled run does not train it again
            versioned = read(VersionedRelease, "version")
            passed, version = read(GateDecision, "gate").passed, read(Registration, "register")
            record_processed(params, versioned.path, passed, version.version, run_dir, None)
        return
    else:
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    record.write(out)


class ResumeError(ValueError):
    """A run folder that ``resume`` cannot finish; nothing was run."""


def missing_stages(run_dir: Path) -> list[str]:
    """The steps of ``run_dir`` without a record file, in pipeline order."""
    return [s for s in STAGES if not (run_dir / FILES[s]).exists()]


def resume(params: Params, run_dir: Path) -> list[str]:
    """Finish a run from its records: run, in order, each step whose record file is missing
    (through ``run_stage``, which reads the earlier ones). Register finds a version it made
    before by its idempotency key; promote still needs the gate's pass on record and the
    champion the run was measured against. Returns the steps run (none: it was complete)."""
    run_dir = Path(run_dir).resolve()
    if not run_dir.is_dir():
        raise ResumeError(f"{run_dir}: no such run folder")
    todo = missing_stages(run_dir)
    if "version" in todo:
        raise ResumeError(
            f"{run_dir} has no {FILES['version']}: its release was never versioned, so there is "
            "nothing to resume; start again with `forgetless run --release DIR`"
        )
    params = run_params(run_dir, params)
    for name in todo:
        run_stage(name, params, run_dir)
    return todo
