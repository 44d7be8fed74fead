"""The steps as DVC stages: ``forgetless step NAME`` runs one step, reading the records of the
steps before it from the run folder and writing its own (``dvc.yaml`` chains them).

The Prefect flow (``flows/retrain.py``) calls the same step functions and writes the same
record files, so a run folder looks alike whichever driver made it.
"""

from __future__ import annotations

import json
from pathlib import Path

import cf_strategies
from flows.config import Params
from flows.data import read_jsonl
from flows.evaluate import evaluate_candidate
from flows.finetune import finetune, rehearsal_prompt_file
from flows.gate import gate
from flows.probes import collect_probe_items, create_probe_set
from flows.promote import promote
from flows.records import (
    FILES,
    STAGES,
    ChampionRef,
    EvalReport,
    GateDecision,
    ProbeSet,
    Registration,
    TrainResult,
    ValidationReport,
    VersionedRelease,
    Violation,
)
from flows.register import register
from flows.tracking import current_champion
from flows.validate import ValidationFailed, normalise_prompt, validate_release
from flows.version import version_release


def validate_step(params: Params, release_dir: Path, champion: ChampionRef) -> ValidationReport:
    """The release's suites, and for rehearsal strategies: no rehearsal prompt is a probe."""
    cfg = params.data
    probe_prompts = [item["prompt"] for item in collect_probe_items(params, champion)]
    report = validate_release(
        release_dir,
        probe_prompts,
        cfg.max_prompt_chars,
        cfg.max_completion_chars,
        {"train": cfg.min_train_records, "eval": cfg.min_eval_records},
    )
    strategies = cf_strategies.build_strategies(params.train.strategy, params.train.strategy_params)
    if not any(hasattr(s, "add_prompts") for s in strategies):
        return report
    probes = {normalise_prompt(p) for p in probe_prompts}
    path = rehearsal_prompt_file(params)
    leaks = [
        Violation(
            file=str(path),
            line=line,
            record_id=str(r.get("id")),
            rule="rehearsal prompt is a probe prompt (probe leaked into training)",
        )
        for line, r in read_jsonl(path)
        if normalise_prompt(r.get("prompt", "")) in probes
    ]
    if not leaks:
        return report
    return report.model_copy(update={"passed": False, "violations": report.violations + leaks})


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
