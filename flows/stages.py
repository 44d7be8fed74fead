"""The steps as DVC stages: ``forgetless step NAME`` runs one step, reading the records of the
steps before it from the run folder and writing its own (``dvc.yaml`` chains them).

The Prefect flow (``flows/retrain.py``) calls the same step functions and writes the same
record files, so a run folder looks alike whichever driver made it.
"""

from __future__ import annotations

import json
from pathlib import Path

from flows.config import Params
from flows.evaluate import evaluate_candidate
from flows.finetune import finetune
from flows.gate import gate
from flows.probes import create_probe_set
from flows.promote import promote
from flows.records import (
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
from flows.register import register
from flows.tracking import current_champion
from flows.validate import ValidationFailed, validate_step
from flows.version import version_release


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
        record = version_release(release_dir, params.workspace_dir, params.dvc_remote)
    elif name == "validate":
        versioned = read(VersionedRelease, "version")
        record = validate_step(params, versioned.path, current_champion(params))
        record.write(out)
        if not record.passed:
            raise ValidationFailed(record)
    elif name == "probes":
        versioned = read(VersionedRelease, "version")
        if not read(ValidationReport, "validate").passed:
            raise ValidationFailed(read(ValidationReport, "validate"))
        record = create_probe_set(params, versioned.path, current_champion(params), run_dir)
    elif name == "finetune":
        if params.train.candidates:
            raise ValueError(
                "train.candidates is set: a strategy tournament runs in the Prefect flow "
                "(forgetless run); the DVC stages train train.strategy alone"
            )
        probe_set = read(ProbeSet, "probes")
        versioned = read(VersionedRelease, "version")
        record = finetune(params, probe_set.champion, versioned.path, run_dir)
    elif name == "evaluate":
        record = evaluate_candidate(
            params,
            read(TrainResult, "finetune").model_dir,
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
            params,
            read(VersionedRelease, "version"),
            read(ProbeSet, "probes"),
            read(TrainResult, "finetune"),
            read(EvalReport, "evaluate"),
            read(GateDecision, "gate"),
            run_dir,
        )
    elif name == "promote":
        record = promote(
            params,
            read(Registration, "register"),
            read(GateDecision, "gate"),
            read(ProbeSet, "probes").champion.version,
        )
    else:
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    record.write(out)
