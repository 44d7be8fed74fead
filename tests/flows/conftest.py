from __future__ import annotations

from pathlib import Path

import pytest
from prefect.testing.utilities import prefect_test_harness

from flows.config import Params
from flows.promote import promote
from flows.records import (
    ChampionRef,
    EvalReport,
    GateCheck,
    GateDecision,
    ProbeSet,
    Registration,
    TrainResult,
    VersionedRelease,
)
from flows.register import register

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


def register_candidate(params: Params, model_dir: Path, demo_dir: Path) -> Registration:
    """Register ``model_dir`` as a passed candidate of release wiki-topics-1 with the real
    ``register`` step (records filled in by hand, no training) and promote it to champion."""
    champion = ChampionRef(version=None, model_dir=model_dir)
    probe_set = ProbeSet(
        path=demo_dir / "probes" / "general_knowledge.jsonl",
        dvc_hash="0" * 32,
        n_items=1,
        tasks=["general-knowledge"],
        baseline={"general-knowledge": 0.5},
        new_task_baseline=0.1,
        champion=champion,
    )
    release = VersionedRelease(
        name="wiki-topics-1",
        path=demo_dir / "releases" / "wiki-topics-1",
        dvc_hash="1" * 32,
        git_commit="2" * 40,
        remote=params.dvc_remote,
    )
    train = TrainResult(
        model_dir=model_dir,
        strategy="naive",
        steps=1,
        train_seconds=1.0,
        log_history=[{"loss": 1.0, "step": 1}],
    )
    report = EvalReport(
        scores={"general-knowledge": 0.5},
        baseline={"general-knowledge": 0.5},
        retention={"general-knowledge": 1.0},
        new_task="wiki-topics-1",
        new_task_score=0.2,
        new_task_baseline=0.1,
        eval_seconds=1.0,
    )
    passed = GateDecision(
        passed=True, checks=[GateCheck(name="x", value=1, threshold=0, passed=True)]
    )
    run_dir = params.workspace_dir / "runs" / "manual"
    run_dir.mkdir(parents=True, exist_ok=True)
    registration = register(params, release, probe_set, train, report, passed, run_dir)
    assert promote(params, registration, passed, None).promoted
    return registration
