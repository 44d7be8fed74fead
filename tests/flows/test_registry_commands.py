"""The registry commands (``history``, ``rollback``, ``promote --force``, the lineage in
``status``) called through ``flows.cli.main`` on a real MLflow SQLite store in a temp folder.

For speed, versions are not trained: each is a trivial pyfunc logged with
``mlflow.pyfunc.log_model`` in a run that carries the run tags and metrics ``flows.steps.register``
logs, with the same model-version tags it sets (its ``model_dir`` artifact is a folder with a
``config.json``, so ``status`` can fetch the champion like a real one). Gate promotions go
through the real ``flows.steps.promote.promote``.
"""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime

import mlflow
import pytest

from flows.core.config import load_params
from flows.core.records import GateCheck, GateDecision, Registration
from flows.registry.history import history
from flows.registry.tracking import CHAMPION, champion_version, client, experiment_id
from flows.steps.promote import promote, promotion_lock
from tests.conftest import write_params
from tests.flows.conftest import PASSED, run_cli

NAME = "forgetless-lm"
FAIL = GateDecision(
    passed=False, checks=[GateCheck(name="min_retention", value=0.5, threshold=0.9, passed=False)]
)


class Echo(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input: list[str], params=None) -> list[str]:
        return model_input


class Store:
    """A temp workspace with its SQLite registry, and helpers to fill and read it."""

    def __init__(self, tmp_path):
        weights = tmp_path / "weights"
        weights.mkdir()
        (weights / "config.json").write_text("{}")
        self.weights = weights
        self.params_file = write_params(tmp_path, weights, tmp_path / "demo")
        self.params = load_params(self.params_file)
        self.params.workspace_dir.mkdir(parents=True)
        self.c = client(self.params.model_store)

    def add(
        self,
        release: str,
        gate: str,
        strategy: str = "naive",
        new_task: float = 0.6,
        retention: float = 0.95,
    ) -> str:
        """Register a version as ``flows.steps.register`` does (tags, metrics), trivially."""
        champion = champion_version(self.params.model_store)
        learned = []
        if champion:
            learned = json.loads(self.tag(champion, "releases_learned"))
        with mlflow.start_run(experiment_id=experiment_id(self.params.model_store)):
            mlflow.log_metrics(
                {
                    "new_task_score": new_task,
                    "new_task_baseline": 0.1,
                    "retention.general-knowledge": retention,
                    "min_retention": retention,
                }
            )
            mlflow.set_tags(
                {
                    "release": release,
                    "strategy": strategy,
                    "gate": gate,
                    "champion_at_start": champion or "base",
                    "release_dvc_hash": "1" * 32,
                    "code_git_commit": "2" * 40,
                }
            )
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=Echo(),
                artifacts={"model_dir": str(self.weights)},
                pip_requirements=["mlflow"],
                registered_model_name=NAME,
            )
        version = str(info.registered_model_version)
        for key, value in {
            "gate": gate,
            "gate_reasons": "" if gate == "passed" else "min_retention 0.5 < 0.9",
            "release": release,
            "releases_learned": json.dumps([*learned, release]),
            "release_dvc_hash": "1" * 32,
            "champion_at_start": champion or "base",
        }.items():
            self.c.set_model_version_tag(NAME, version, key, value)
        return version

    def retrain(self, release: str, gate: str = "passed", **kw) -> str:
        """Register and run the real promotion step, as a retrain does."""
        start = champion_version(self.params.model_store)
        version = self.add(release, gate, **kw)
        reg = Registration(name=NAME, version=version, run_id="r")
        promote(self.params.model_store, reg, PASSED if gate == "passed" else FAIL, start)
        return version

    def tag(self, version: str, key: str) -> str | None:
        return self.c.get_model_version(NAME, version).tags.get(key)

    def tags(self, version: str) -> dict[str, str]:
        return dict(self.c.get_model_version(NAME, version).tags)

    def champion(self) -> str | None:
        return champion_version(self.params.model_store)

    def state(self) -> tuple:
        """Everything a command may change: the aliases and every version's tags."""
        from flows.registry.history import all_versions

        aliases = dict(self.c.get_registered_model(NAME).aliases)
        return aliases, {mv.version: self.tags(mv.version) for mv in all_versions(self.c, NAME)}

    def cli(self, *args: str) -> tuple[int, str]:
        """Run ``forgetless --params <store> ARGS``; the exit code and what it printed."""
        return run_cli(self.params_file, *args)


@pytest.fixture
def store(tmp_path, monkeypatch) -> Store:
    monkeypatch.setenv("FORGETLESS_USER", "alice")
    return Store(tmp_path)


def recent(stamp: str) -> bool:
    """An ISO timestamp in UTC from the last minute."""
    at = datetime.fromisoformat(stamp)
    return (
        at.utcoffset() is not None
        and at.utcoffset().total_seconds() == 0
        and (0 <= (datetime.now(UTC) - at).total_seconds() < 60)
    )


def test_rollback_moves_the_alias_back_and_records_who_when_why(store):
    v1 = store.retrain("wiki-topics-1")
    v2 = store.retrain("wiki-topics-2")
    assert store.champion() == v2

    code, out = store.cli("rollback", "--reason", "v2 answers in French")
    assert code == 0, out
    assert store.champion() == v1
    restored, demoted = store.tags(v1), store.tags(v2)
    assert restored["rollback.by"] == "alice"
    assert restored["rollback.reason"] == "v2 answers in French"
    assert restored["rollback.from"] == v2
    assert recent(restored["rollback.at"])
    assert demoted["demoted.by"] == "alice"
    assert demoted["demoted.reason"] == "v2 answers in French"
    assert demoted["demoted.to"] == v1
    assert demoted["demoted.via"] == "rollback"
    assert demoted["demoted.at"] == restored["rollback.at"]
    assert restored["previous_champion"] == "base"  # the chain itself is not rewritten
    assert f"v{v2} → v{v1}" in out

    # v1 replaced the base model: rolling back again removes the alias.
    code, out = store.cli("rollback", "--reason", "x")
    assert code == 0, out
    assert store.champion() is None
    assert CHAMPION not in store.c.get_registered_model(NAME).aliases
    assert store.tag(v1, "demoted.to") == "base"
    assert "the base model" in out


def test_rollback_without_a_previous_champion_refuses_and_changes_nothing(store, monkeypatch):
    store.retrain("wiki-topics-1", gate="failed")  # registered, never champion
    before = store.state()
    code, out = store.cli("rollback", "--reason", "bad answers")
    assert code == 2
    assert "no champion to roll back" in out and len(out.strip().splitlines()) == 1
    assert store.state() == before

    # A champion set by hand, outside the pipeline, has no previous_champion tag.
    v2 = store.add("wiki-topics-2", "passed")
    store.c.set_registered_model_alias(NAME, CHAMPION, v2)
    before = store.state()
    code, out = store.cli("rollback", "--reason", "bad answers")
    assert code == 2 and "has no previous_champion tag" in out
    assert store.state() == before


def test_rollback_to_a_named_version_only_if_it_was_champion_or_passed(store, monkeypatch):
    v1 = store.retrain("wiki-topics-1")
    v2 = store.retrain("wiki-topics-2")
    v3 = store.retrain("wiki-topics-3")
    v4 = store.retrain("wiki-topics-4", gate="failed")
    before = store.state()
    for args, cause in [
        (["rollback", v4, "--reason", "x"], f"v{v4} was never champion and did not pass"),
        (["rollback", "9", "--reason", "x"], "has no version 9"),
        (["rollback", "latest", "--reason", "x"], "VERSION must be a registered version"),
        (["rollback", v3, "--reason", "x"], f"v{v3} is already the champion"),
        (["rollback", v1], "a reason is required"),
        (["rollback", v1, "--reason", "   "], "a reason is required"),
    ]:
        code, out = store.cli(*args)
        assert code == 2, (args, out)
        assert cause in out and len(out.strip().splitlines()) == 1, (args, out)
        assert store.state() == before, args

    monkeypatch.setenv("FORGETLESS_USER", "bob")
    code, out = store.cli("rollback", v1, "--reason", "p")  # a short reason is enough
    assert code == 0, out
    assert store.champion() == v1
    assert store.tag(v1, "rollback.from") == v3 and store.tag(v1, "rollback.by") == "bob"
    assert store.tag(v3, "demoted.to") == v1
    assert store.tag(v2, "demoted.to") is None  # skipped over, never demoted itself

    code, _ = store.cli("rollback", v3, "--reason", "the French was fine")  # was champion
    assert code == 0 and store.champion() == v3
    assert store.tag(v3, "previous_champion") == v2  # unchanged: its place in the chain
    code, _ = store.cli("rollback", "--reason", "r")
    assert code == 0 and store.champion() == v2
    code, _ = store.cli("rollback", "base", "--reason", "all of them regress")
    assert code == 0 and store.champion() is None
    assert store.tag(v2, "demoted.to") == "base"


def test_rollback_to_a_passed_version_that_never_held_the_alias(store):
    v1 = store.retrain("wiki-topics-1")
    v2 = store.add("wiki-topics-2", "passed")  # passed, but beaten to promotion
    assert store.tag(v2, "previous_champion") is None
    code, out = store.cli("rollback", v2, "--reason", "v1 regressed in production")
    assert code == 0, out
    assert store.champion() == v2
    assert store.tag(v2, "previous_champion") == v1  # joins the chain where it took over
    code, _ = store.cli("rollback", "--reason", "undo")
    assert code == 0 and store.champion() == v1


def test_rollback_reads_the_champion_inside_the_lock(store):
    v1 = store.retrain("wiki-topics-1")
    v2 = store.retrain("wiki-topics-2")
    results = []
    with promotion_lock(store.params.model_store):
        worker = threading.Thread(
            target=lambda: results.append(store.cli("rollback", "--reason", "late")), daemon=True
        )
        worker.start()
        time.sleep(1.0)  # the rollback reads v2 now if it reads outside the lock
        v3 = store.add("wiki-topics-3", "passed")  # a promotion lands meanwhile
        store.c.set_registered_model_alias(NAME, CHAMPION, v3)
        store.c.set_model_version_tag(NAME, v3, "previous_champion", v2)
    worker.join(timeout=60)
    assert results and results[0][0] == 0, results
    assert store.champion() == v2  # v3 rolled back, not v2
    assert store.tag(v3, "demoted.to") == v2
    assert store.tag(v2, "rollback.from") == v3
    assert store.tag(v1, "rollback.at") is None


def test_forced_promotion_needs_force_and_a_reason_and_is_audited(store, monkeypatch):
    v1 = store.retrain("wiki-topics-1")
    v2 = store.retrain("wiki-topics-2", gate="failed")
    assert store.tag(v2, "promotion") == "not promoted (gate failed)"
    before = store.state()
    for args, cause in [
        (["promote", v2, "--reason", "hotfix"], "pass --force"),
        (["promote", v2, "--force"], "a reason is required"),
        (["promote", v2, "--force", "--reason", ""], "a reason is required"),
        (["promote", "7", "--force", "--reason", "hotfix"], "has no version 7"),
        (["promote", v1, "--force", "--reason", "hotfix"], "already the champion"),
    ]:
        code, out = store.cli(*args)
        assert code == 2, (args, out)
        assert cause in out and len(out.strip().splitlines()) == 1, (args, out)
        assert store.state() == before, args

    monkeypatch.setenv("FORGETLESS_USER", "carol")
    code, out = store.cli(
        "promote", v2, "--force", "--reason", "retention probe known broken, INC-42"
    )
    assert code == 0, out
    assert store.champion() == v2
    tags = store.tags(v2)
    assert tags["forced_promotion.by"] == "carol"
    assert tags["forced_promotion.reason"] == "retention probe known broken, INC-42"
    assert recent(tags["forced_promotion.at"])
    assert tags["previous_champion"] == v1
    assert tags["gate"] == "failed"  # the gate's verdict stays as it was
    assert tags["promotion"].startswith("promoted ") and "forced by carol" in tags["promotion"]
    assert store.tag(v1, "demoted.to") == v2 and store.tag(v1, "demoted.via") == "promote"

    # An earlier champion is reached by rollback, which keeps the chain.
    before = store.state()
    code, out = store.cli("promote", v1, "--force", "--reason", "back")
    assert code == 2 and f"forgetless rollback {v1}" in out
    assert store.state() == before
    code, _ = store.cli("rollback", "--reason", "forced one misbehaves")
    assert code == 0 and store.champion() == v1


def test_history_lists_every_version_with_its_decision(store):
    v1 = store.retrain("wiki-topics-1", new_task=0.61, retention=0.97)
    v2 = store.retrain("wiki-topics-2", gate="failed", strategy="ewc", retention=0.42)
    v3 = store.retrain("wiki-topics-3", strategy="replay", new_task=0.7)
    assert store.cli("rollback", "--reason", "drift")[0] == 0

    rows = history(store.params.model_store)
    assert [r.version for r in rows] == [v1, v2, v3]
    assert [r.release for r in rows] == ["wiki-topics-1", "wiki-topics-2", "wiki-topics-3"]
    assert [r.strategy for r in rows] == ["naive", "ewc", "replay"]
    assert [r.gate for r in rows] == ["passed", "failed", "passed"]
    assert [r.promoted for r in rows] == [True, False, True]
    assert [r.champion for r in rows] == [True, False, False]
    assert rows[0].new_task_score == pytest.approx(0.61)
    assert rows[1].min_retention == pytest.approx(0.42)
    assert rows[1].promotion == "not promoted (gate failed)"
    assert any("demoted to v1 (rollback) by alice" in n for n in rows[2].notes)

    code, out = store.cli("history")
    assert code == 0, out
    lines = out.splitlines()
    row = {
        v: next(line for line in lines if f" {v} " in line and "wiki-topics" in line)
        for v in (v1, v2, v3)
    }
    assert "wiki-topics-1" in row[v1] and "passed" in row[v1] and "champion" in row[v1]
    assert "0.610" in row[v1] and "0.970" in row[v1] and "yes: promoted" in row[v1]
    assert "failed: min_retention 0.5 < 0.9" in row[v2] and "ewc" in row[v2]
    assert "0.420" in row[v2] and "no: not promoted (gate failed)" in row[v2]
    assert "champion" not in row[v2] and "champion" not in row[v3].split("demoted")[0]
    assert "demoted to v1 (rollback) by alice" in out and ": drift" in out


def test_history_of_an_empty_registry(store):
    code, out = store.cli("history")
    assert code == 0 and "no versions of forgetless-lm registered yet" in out


def test_status_prints_the_lineage(store):
    code, out = store.cli("status")
    assert code == 0, out
    assert "champion lineage: base" in out

    v1 = store.retrain("wiki-topics-1")
    store.retrain("wiki-topics-2", gate="failed")
    v3 = store.retrain("wiki-topics-3", strategy="ewc")
    v4 = store.add("wiki-topics-4", "failed", strategy="replay")
    assert store.cli("promote", v4, "--force", "--reason", "INC-7")[0] == 0
    code, out = store.cli("status")
    assert code == 0, out
    assert f"champion lineage: v{v4} ← v{v3} ← v{v1} ← base" in out
    assert f"champion: {v4}" in out
    lines = out.splitlines()
    assert any(
        "wiki-topics-4" in ln and "replay" in ln and "forced by alice: INC-7" in ln for ln in lines
    )
    assert any(
        "wiki-topics-3" in ln and "ewc" in ln and "promoted by the gate" in ln for ln in lines
    )
    assert any("wiki-topics-1" in ln and "naive" in ln for ln in lines)

    assert store.cli("rollback", v1, "--reason", "both regress")[0] == 0
    code, out = store.cli("status")
    assert code == 0, out
    assert f"champion lineage: v{v1} ← base" in out
    assert f"rollback from v{v4} by alice: both regress" in out
