from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import pytest
from prefect.testing.utilities import prefect_test_harness
from rich.console import Console

from flows.cli import main as cli
from flows.core.config import Params
from flows.core.records import (
    FILES,
    STAGES,
    ChampionRef,
    EvalReport,
    GateCheck,
    GateDecision,
    ProbeSet,
    Registration,
    TrainResult,
    ValidationReport,
    VersionedRelease,
)
from flows.steps.promote import promote
from flows.steps.register import RegisterStep, register

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def prefect_harness():
    """A real Prefect API (temporary, SQLite) for the flow tests; 2 cores need a long start-up."""
    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture(scope="session", autouse=True)
def no_mlruns_in_checkout():
    """Every MLflow artifact the tests make stays in their temporary workspaces: the checkout
    gains nothing under ``mlruns/`` (MLflow's default artifact root in the working folder)."""
    before = set((ROOT / "mlruns").rglob("*"))
    yield
    added = sorted(str(p) for p in set((ROOT / "mlruns").rglob("*")) - before)
    assert not added, f"the tests wrote MLflow artifacts into the checkout: {added[:5]}"


# The gate's decisions on a hand-made run (its report: retention 1.0, new-task score 0.2): one
# check each, as the gate would write them.
PASSED = GateDecision(
    passed=True,
    checks=[GateCheck(name="retention/general-knowledge", value=1.0, threshold=0.9, passed=True)],
)
FAILED = GateDecision(
    passed=False, checks=[GateCheck(name="new_task_score", value=0.2, threshold=0.5, passed=False)]
)


class GatedRun(NamedTuple):
    """The records of a run that went through the gate, one per step up to ``gate``."""

    release: VersionedRelease
    validation: ValidationReport
    probe_set: ProbeSet
    train: TrainResult
    report: EvalReport
    decision: GateDecision

    def write(self, run_dir: Path) -> None:
        """Each record into its file in ``run_dir``, as the steps write them (for resume)."""
        for stage, record in zip(STAGES[: STAGES.index("register")], self, strict=True):
            record.write(run_dir / FILES[stage])

    def register(self, params: Params, run_dir: Path) -> Registration:
        """The real ``register`` step on these records."""
        return register(
            RegisterStep.from_params(params),
            self.release,
            self.probe_set,
            self.train,
            self.report,
            self.decision,
            run_dir,
        )


def gated_run(
    params: Params,
    candidate: Path | TrainResult,
    demo_dir: Path,
    *,
    release: str = "wiki-topics-1",
    dvc_hash: str = "1" * 32,
    champion: str | None = None,
    passed: bool = True,
    new_task_score: float = 0.2,
) -> GatedRun:
    """The records of a run of ``release`` that got as far as the gate, made by hand (no
    training, no scoring): ``candidate`` is the model folder (a one-step naive TrainResult) or
    a TrainResult, ``dvc_hash`` tells releases apart, ``champion`` is the version the run
    started from (None: the base), ``passed`` the gate's verdict. The release's data is the
    demo's wiki-topics-1, whatever its name."""
    if not isinstance(candidate, TrainResult):
        candidate = TrainResult(
            model_dir=candidate,
            strategy="naive",
            steps=1,
            train_seconds=1.0,
            log_history=[{"loss": 1.0, "step": 1}],
        )
    probe_set = ProbeSet(
        path=demo_dir / "probes" / "general_knowledge.jsonl",
        dvc_hash="0" * 32,
        n_items=1,
        tasks=["general-knowledge"],
        baseline={"general-knowledge": 0.5},
        new_task_baseline=0.1,
        champion=ChampionRef(version=champion, model_dir=candidate.model_dir),
    )
    report = EvalReport(
        scores={"general-knowledge": 0.5},
        baseline={"general-knowledge": 0.5},
        retention={"general-knowledge": 1.0},
        new_task=release,
        new_task_score=new_task_score,
        new_task_baseline=0.1,
        eval_seconds=1.0,
    )
    versioned = VersionedRelease(
        name=release,
        path=demo_dir / "releases" / "wiki-topics-1",
        dvc_hash=dvc_hash,
        git_commit="2" * 40,
        remote=params.dvc_remote,
    )
    validation = ValidationReport(release=release, passed=True)
    decision = PASSED if passed else FAILED
    return GatedRun(versioned, validation, probe_set, candidate, report, decision)


def register_candidate(params: Params, model_dir: Path, demo_dir: Path) -> Registration:
    """Register ``model_dir`` as a passed candidate of release wiki-topics-1 with the real
    ``register`` step (records made by ``gated_run``) and promote it to champion."""
    run = gated_run(params, model_dir, demo_dir)
    run_dir = params.workspace_dir / "runs" / "manual"
    run_dir.mkdir(parents=True, exist_ok=True)
    registration = run.register(params, run_dir)
    assert promote(params.model_store, registration, run.decision, None).promoted
    return registration


def run_cli(params_file: Path, *args: str) -> tuple[int, str]:
    """``forgetless --params PARAMS ARGS``, the command a user types: the exit code and what it
    printed."""
    console = Console(width=400, record=True, force_terminal=False)
    original, cli.console = cli.console, console
    try:
        code = cli.main(["--params", str(params_file), *args])
    finally:
        cli.console = original
    return code, console.export_text()
