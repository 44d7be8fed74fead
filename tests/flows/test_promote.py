"""Promotion on a real MLflow registry (SQLite): only a pass, only from the champion the
retrain was measured against, and of two racing retrains exactly one wins."""

from concurrent.futures import ThreadPoolExecutor

import pytest
from mlflow import MlflowClient

from flows.core.config import load_params
from flows.core.records import Registration
from flows.registry.tracking import champion_version, client
from flows.steps.promote import promote
from tests.conftest import count
from tests.flows.conftest import FAILED, PASSED


@pytest.fixture
def registry(params_file):
    params = load_params(params_file)
    params.workspace_dir.mkdir(parents=True)
    c: MlflowClient = client(params.model_store)
    c.create_registered_model("forgetless-lm")

    def new_version(gate: str) -> Registration:
        mv = c.create_model_version("forgetless-lm", source=str(params.workspace_dir))
        c.set_model_version_tag("forgetless-lm", mv.version, "gate", gate)
        return Registration(name="forgetless-lm", version=str(mv.version), run_id="r")

    return params, c, new_version


def test_only_a_pass_moves_the_alias(registry):
    params, c, new_version = registry
    failed = promote(params.model_store, new_version("failed"), FAILED, None)
    assert not failed.promoted and champion_version(params.model_store) is None
    passed = promote(params.model_store, new_version("passed"), PASSED, None)
    assert passed.promoted and champion_version(params.model_store) == "2"
    assert c.get_model_version("forgetless-lm", "2").tags["previous_champion"] == "base"


def test_a_stale_champion_blocks_promotion(registry):
    params, c, new_version = registry
    count("race", "champion changed while a retrain ran (stale champion)")
    promote(
        params.model_store, new_version("passed"), PASSED, None
    )  # v1 becomes champion meanwhile
    late = promote(
        params.model_store, new_version("passed"), PASSED, None
    )  # measured against the base
    assert not late.promoted and "changed from base to 1" in late.reason
    assert champion_version(params.model_store) == "1"
    assert "not promoted" in c.get_model_version("forgetless-lm", "2").tags["promotion"]


def test_a_version_not_tagged_passed_is_never_promoted(registry):
    params, c, new_version = registry
    count("bad input", "a pass for a version tagged gate=failed (promote)")
    with pytest.raises(RuntimeError, match="not tagged gate=passed"):
        # a decision that disagrees with the tag
        promote(params.model_store, new_version("failed"), PASSED, None)
    assert champion_version(params.model_store) is None
    assert "promotion" not in c.get_model_version("forgetless-lm", "1").tags  # untouched


def test_two_retrains_racing_to_promote_one_wins(registry):
    params, c, new_version = registry
    a, b = new_version("passed"), new_version("passed")
    count("race", "two retrains promote from one champion (threads, one machine)")
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda r: promote(params.model_store, r, PASSED, None), [a, b]))
    assert sorted(r.promoted for r in results) == [False, True]
    (won,) = [reg.version for r, reg in zip(results, [a, b], strict=True) if r.promoted]
    (lost,) = [(r, reg.version) for r, reg in zip(results, [a, b], strict=True) if not r.promoted]
    assert champion_version(params.model_store) == won
    assert lost[0].reason.startswith(f"champion changed from base to {won}")
    tag = c.get_model_version("forgetless-lm", lost[1]).tags["promotion"]
    assert tag.startswith(f"not promoted (champion changed from base to {won}")
