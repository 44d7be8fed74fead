"""Promotions racing across machines: two processes with separate workspaces (so separate file
locks) promote two candidates measured against the same champion on one real ``mlflow server``.
With the Prefect lock (a global concurrency limit on a real ``prefect server``) exactly one wins
and the other is told the champion changed; with file locks alone both are told they won.
"""

from __future__ import annotations

import contextvars
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.settings import PREFECT_API_URL, temporary_settings

from flows.core.config import ParamsError, load_params
from flows.core.records import Registration
from flows.registry.locks import LockMisconfigured, LockUnavailable, limit_name, lock_kind
from flows.registry.tracking import CHAMPION, champion_version
from flows.steps.promote import promote, promotion_lock, rollback
from tests.conftest import count, write_params
from tests.flows.conftest import PASSED
from tests.flows.mlflow_server import MlflowServer, free_port
from tests.flows.prefect_server import PrefectServer

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    folder = tmp_path_factory.mktemp("race-servers")
    mlflow, prefect = MlflowServer(folder / "mlflow"), PrefectServer(folder / "prefect")
    mlflow.start()
    try:
        prefect.start()
        yield mlflow, prefect
    finally:
        prefect.stop()
        mlflow.stop()


def registry_with_champion(url: str, name: str, candidates: int) -> MlflowClient:
    """Registered model ``name``: v1 champion (promoted from the base), then ``candidates``
    versions that passed the gate and wait for promotion."""
    c = MlflowClient(url, url)
    c.create_registered_model(name)
    experiment = c.create_experiment(name)
    for v in range(1, candidates + 2):
        run = c.create_run(experiment).info  # a server takes a version's source from a run
        c.create_model_version(name, source=f"{run.artifact_uri}/model", run_id=run.run_id)
        c.set_model_version_tag(name, str(v), "gate", "passed")
        c.set_model_version_tag(name, str(v), "promotion", "pending")
    c.set_registered_model_alias(name, CHAMPION, "1")
    c.set_model_version_tag(name, "1", "promotion", "promoted")
    c.set_model_version_tag(name, "1", "previous_champion", "base")
    return c


def machine(tmp_path: Path, label: str, ctx, url: str, name: str, lock: str) -> Path:
    """The params file of one "machine": its own workspace, so its own file lock."""
    folder = tmp_path / label
    folder.mkdir()
    (folder / "workspace").mkdir()
    return write_params(
        folder,
        *ctx,
        tracking={"uri": url, "promote_lock": lock},
        model={"registered_name": name},
    )


def race(tmp_path: Path, params_files: list[Path], versions: list[str], prefect_url: str) -> list:
    """Run one racing process per params file, released together; their outcomes."""
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    env = os.environ | {"PREFECT_API_URL": prefect_url, "PREFECT_HOME": str(tmp_path / "home")}
    procs = []
    for params_file, version in zip(params_files, versions, strict=True):
        out = tmp_path / f"result-{version}.json"
        cmd = [sys.executable, "-m", "tests.flows.race_child", str(params_file), version, "1"]
        log = (tmp_path / f"racer-{version}.log").open("w")
        procs.append(
            (
                subprocess.Popen(
                    [*cmd, str(barrier), str(out)], cwd=ROOT, env=env, stdout=log, stderr=log
                ),
                out,
                log,
            )
        )
    results = []
    for proc, out, log in procs:
        code = proc.wait(timeout=600)
        log.close()
        assert code == 0, Path(log.name).read_text()[-3000:]
        results.append(json.loads(out.read_text()))
    return results


@pytest.mark.slow  # real mlflow and prefect servers (started once: ~30 s)
def test_two_machines_promoting_from_one_champion_with_the_prefect_lock_one_wins(
    tmp_path, tiny_model_dir, demo_dir, servers
):
    mlflow, prefect = servers
    name = "race-prefect-lm"
    c = registry_with_champion(mlflow.url, name, candidates=2)
    v1_tags = c.get_model_version(name, "1").tags
    ctx = (tiny_model_dir, demo_dir)
    files = [machine(tmp_path, m, ctx, mlflow.url, name, "auto") for m in ("a", "b")]
    count("race", "two machines promote from one champion (Prefect lock, remote MLflow)")
    results = race(tmp_path, files, ["2", "3"], prefect.url)

    assert [r["lock"] for r in results] == ["prefect", "prefect"]  # auto: the server is set
    (won,) = [r for r in results if r["promoted"]]
    (lost,) = [r for r in results if not r["promoted"]]
    w, lo = won["version"], lost["version"]
    assert lost["reason"].startswith(f"champion changed from 1 to {w} while this retrain ran")
    assert lost["champion"] == w
    # The registry says so: one champion, the loser tagged with why, v1 untouched.
    assert str(c.get_model_version_by_alias(name, CHAMPION).version) == w
    winner, loser = c.get_model_version(name, w).tags, c.get_model_version(name, lo).tags
    assert winner["promotion"].startswith("promoted") and winner["previous_champion"] == "1"
    assert loser["promotion"].startswith(f"not promoted (champion changed from 1 to {w}")
    assert "previous_champion" not in loser
    assert c.get_model_version(name, "1").tags == v1_tags
    # The limit was created with one slot, and both racers released it.
    with (
        temporary_settings(updates={PREFECT_API_URL: prefect.url}),
        get_client(sync_client=True) as client,
    ):
        limit = client.read_global_concurrency_limit_by_name(f"forgetless-promote-{name}")
    assert (limit.limit, limit.active, limit.active_slots) == (1, True, 0)


@pytest.mark.slow  # real mlflow and prefect servers (started once: ~30 s)
def test_two_machines_with_file_locks_both_think_they_won(
    tmp_path, tiny_model_dir, demo_dir, servers
):
    """The same race with ``promote_lock: file``: each machine's lock is its own, both read
    the old champion, both move the alias and the last write stands. This is the failure the
    Prefect lock prevents (and the race above would show without it)."""
    mlflow, prefect = servers
    name = "race-file-lm"
    c = registry_with_champion(mlflow.url, name, candidates=2)
    ctx = (tiny_model_dir, demo_dir)
    files = [machine(tmp_path, m, ctx, mlflow.url, name, "file") for m in ("a", "b")]
    count("race", "two machines promote from one champion (file locks: both promoted)")
    results = race(tmp_path, files, ["2", "3"], prefect.url)

    assert [r["lock"] for r in results] == ["file", "file"]
    assert [r["promoted"] for r in results] == [True, True]  # the guarantee does not hold
    champion = str(c.get_model_version_by_alias(name, CHAMPION).version)
    assert champion in ("2", "3")
    for v in ("2", "3"):  # a fork in the chain of champions: both replaced v1
        assert c.get_model_version(name, v).tags["previous_champion"] == "1"


@pytest.mark.slow  # real mlflow and prefect servers (started once: ~30 s)
def test_a_rollback_waits_for_the_prefect_lock_and_reads_the_champion_inside_it(
    tmp_path, tiny_model_dir, demo_dir, servers
):
    mlflow, prefect = servers
    name = "race-rollback-lm"  # a limit of its own: Prefect keeps one client per limit name
    c = registry_with_champion(mlflow.url, name, candidates=2)
    c.set_registered_model_alias(name, CHAMPION, "2")  # v2 took over from v1
    c.set_model_version_tag(name, "2", "previous_champion", "1")
    ctx = (tiny_model_dir, demo_dir)
    holder = load_params(machine(tmp_path, "a", ctx, mlflow.url, name, "prefect"))
    other = load_params(machine(tmp_path, "b", ctx, mlflow.url, name, "prefect"))
    count("race", "a rollback while another machine promotes (Prefect lock)")
    results: list = []
    with temporary_settings(updates={PREFECT_API_URL: prefect.url}):
        with promotion_lock(holder.model_store) as held:
            assert held == f"Prefect concurrency limit forgetless-promote-{name} at {prefect.url}"
            run = contextvars.copy_context().run  # the thread sees the same Prefect settings
            worker = threading.Thread(
                target=run,
                args=(lambda: results.append(rollback(other.model_store, None, "late")),),
            )
            worker.start()
            time.sleep(3.0)
            assert worker.is_alive() and not results  # waiting for the lock
            c.set_registered_model_alias(name, CHAMPION, "3")  # a promotion lands meanwhile
            c.set_model_version_tag(name, "3", "previous_champion", "2")
        worker.join(timeout=120)
    (move,) = results
    assert (move.from_version, move.to_version) == ("3", "2")  # v3 rolled back, not v2
    assert str(c.get_model_version_by_alias(name, CHAMPION).version) == "2"
    assert c.get_model_version(name, "3").tags["demoted.to"] == "2"
    assert "rollback.at" not in c.get_model_version(name, "1").tags


@pytest.fixture
def sqlite_registry(tmp_path, tiny_model_dir, demo_dir):
    """A SQLite registry with one passed candidate (v1) and no champion; ``promote_lock:
    prefect`` and a registered name of its own."""
    params = load_params(
        write_params(
            tmp_path,
            tiny_model_dir,
            demo_dir,
            tracking={"promote_lock": "prefect"},
            model={"registered_name": f"lock-{tmp_path.name}"},
        )
    )
    params.workspace_dir.mkdir(parents=True)
    name = params.model.registered_name
    c = MlflowClient(params.tracking_uri, params.tracking_uri)
    c.create_registered_model(name)
    c.create_model_version(name, source=str(params.workspace_dir))
    c.set_model_version_tag(name, "1", "gate", "passed")
    c.set_model_version_tag(name, "1", "promotion", "pending")
    return params, c, Registration(name=name, version="1", run_id="r")


def test_an_unreachable_prefect_api_promotes_nothing(sqlite_registry):
    params, c, registration = sqlite_registry
    url = f"http://127.0.0.1:{free_port()}/api"
    count("service fault", "Prefect API unreachable when promoting (Prefect lock)")
    with (
        temporary_settings(updates={PREFECT_API_URL: url}),
        pytest.raises(LockUnavailable) as err,
    ):
        promote(params.model_store, registration, PASSED, None)
    message = str(err.value)
    assert f"Prefect API {url} is unreachable" in message
    assert f"the promotion lock {limit_name(params.model_store)} cannot be taken" in message
    assert "nothing was promoted" in message and "forgetless resume RUN_DIR" in message
    assert champion_version(params.model_store) is None
    assert c.get_model_version(registration.name, "1").tags["promotion"] == "pending"


@pytest.mark.slow  # real mlflow and prefect servers (started once: ~30 s)
def test_a_promotion_limit_that_does_not_serialise_is_refused(sqlite_registry, servers):
    params, c, registration = sqlite_registry
    _, prefect = servers
    name = limit_name(params.model_store)
    count("service fault", "Prefect promotion limit set to 2 slots")
    with temporary_settings(updates={PREFECT_API_URL: prefect.url}):
        with get_client(sync_client=True) as client:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=2))
        with pytest.raises(LockMisconfigured) as err:
            promote(params.model_store, registration, PASSED, None)
    assert f"{name} at {prefect.url} has limit 2" in str(err.value)
    assert f"prefect gcl update {name} --limit 1 --enable" in str(err.value)
    assert champion_version(params.model_store) is None
    assert c.get_model_version(registration.name, "1").tags["promotion"] == "pending"


def test_the_lock_setting(tmp_path, tiny_model_dir, demo_dir):
    params = load_params(write_params(tmp_path, tiny_model_dir, demo_dir))
    assert params.tracking.promote_lock == "auto"
    prefect = params.with_overrides({"tracking.promote_lock": "prefect"})
    file = params.with_overrides({"tracking.promote_lock": "file"})
    with temporary_settings(restore_defaults={PREFECT_API_URL}):  # no server: ephemeral
        assert lock_kind(params.model_store) == "file"
        with pytest.raises(LockMisconfigured, match="PREFECT_API_URL is not set"):
            lock_kind(prefect.model_store)
    with temporary_settings(updates={PREFECT_API_URL: "http://prefect.example:4200/api"}):
        assert (
            lock_kind(params.model_store),
            lock_kind(file.model_store),
            lock_kind(prefect.model_store),
        ) == (
            "prefect",
            "file",
            "prefect",
        )
    count("bad input", "bad params.yaml (tracking.promote_lock)")
    bad = write_params(tmp_path, tiny_model_dir, demo_dir, tracking={"promote_lock": "redis"})
    with pytest.raises(ParamsError, match=r"tracking\.promote_lock: .*'auto', 'file' or 'prefect'"):
        load_params(bad)
