"""Parameter isolation in the pipeline: packnet and progressive learn two releases through the
real retrain flow, each old task is scored through its own mask or column (so nothing is lost,
item for item), and the registered champion answers by task from MLflow in a fresh process
outside the repository."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient
from safetensors.torch import load_file

from flows.core.config import load_params
from flows.core.data import probe_example, read_jsonl
from flows.drivers.retrain import retrain
from flows.registry import serving
from flows.registry.tracking import candidate_dir
from flows.scoring.scoring import score_examples
from flows.steps.evaluate import read_results
from tests.conftest import GENERAL_TASKS, write_params
from tests.flows.conftest import ROOT
from tests.flows.outside_repo import run_outside_repo

pytestmark = pytest.mark.usefixtures("prefect_harness")

OPTIONS = {
    "packnet": {"packnet": {"prune_ratio": 0.5}},  # 40 steps: prunes at 32, retrains for 8
    "progressive": {"progressive": {"rank": 8, "alpha": 16.0}},
}

# Run outside the repository: flows, tests and benchmarks cannot be imported; cf_strategies
# must come from the model's own logged code.
NOT_CF_STRATEGIES = ("flows", "tests", "benchmarks")
SERVE_BY_TASK = """
out = {task or "": model.predict(prompts, params={"task": task}) for task in tasks}
out["no task"] = model.predict(prompts)
try:
    model.predict(prompts, params={"task": "wiki-topics-9"})
except Exception as err:
    out["unknown"] = str(err)
import cf_strategies
out["cf_strategies"] = cf_strategies.__file__
"""


@pytest.fixture(scope="module", params=sorted(OPTIONS))
def two_releases(request, tmp_path_factory, tiny_model_dir, demo_dir):
    """``(params_file, first, second)``: the strategy learned wiki-topics-1, then wiki-topics-2,
    with a gate that asks every old task to be kept (retention ≥ 0.99, lower bound)."""
    name = request.param
    tmp = tmp_path_factory.mktemp(name)
    params_file = write_params(
        tmp,
        tiny_model_dir,
        demo_dir,
        train={"strategy": name, "strategy_params": OPTIONS[name]},
        gate={"min_new_task_score": 0.0},
        evaluate={"new_task_max_new_tokens": 12},  # release 2's labels are several words
    )
    first = retrain(params_file=str(params_file))
    second = retrain(params_file=str(params_file))
    return params_file, first, second


def client_of(params_file) -> MlflowClient:
    uri = load_params(params_file).tracking_uri
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def test_each_old_task_is_scored_through_its_own_parameters(two_releases, tiny_model_dir):
    params_file, first, second = two_releases
    assert first.promotion.promoted and second.promotion.promoted, second.gate.reasons
    assert second.champion_at_start == "1"
    for run in (first, second):  # it learned each release
        assert run.eval.new_task_score > run.eval.new_task_baseline, run.eval
    # Release 1's items, through their own parameters, answered exactly as the champion answered
    # them: item for item, nothing lost.
    assert second.eval.retention["wiki-topics-1"] == 1.0
    stats = second.eval.tasks["wiki-topics-1"]
    assert stats.lost == stats.gained == 0
    baseline = {
        (r["task"], r["id"]): r for r in read_results(second.run_dir / "baseline/probes.jsonl")
    }
    candidate = read_results(second.run_dir / "candidate" / "probes.jsonl")
    assert {r["task"] for r in candidate} == {*GENERAL_TASKS, "wiki-topics-1"}
    for r in candidate:
        if r["task"] == "wiki-topics-1":
            assert r["output"] == baseline[(r["task"], r["id"])]["output"]
            assert r["answered_by"] == "wiki-topics-1"
        else:  # general knowledge: what a request without a task gets, not the base weights
            assert r["answered_by"] == "default"
    # The gate scored general knowledge on the answers the endpoint gives without a task.
    params = load_params(params_file)
    v2_dir = candidate_dir(params.model_store, second.run_dir / "candidate_model")
    general = [r for r in candidate if r["task"] in GENERAL_TASKS]
    test_file = params.workspace_dir / "probes" / "test.jsonl"
    probes = {(r["task"], r["id"]): r for _, r in read_jsonl(test_file)}
    model, tokenizer, router = serving.load_for_serving(v2_dir)
    with router.answering(None) as m:  # what a request without a task gets
        served = score_examples(
            m,
            tokenizer,
            [probe_example(probes[(r["task"], r["id"])]) for r in general],
            False,
            6,
            32,
        )
    assert general and [r["output"] for r in general] == [r["output"] for r in served]
    # The new release through its own parameters; the champion, which had not learned it, through
    # its default route.
    new_items = read_results(second.run_dir / "candidate" / "new_task.jsonl")
    assert {r["answered_by"] for r in new_items} == {"wiki-topics-2"}

    # Nothing merged: the candidate's weights are the base model's, bit for bit (registered:
    # the run folder keeps a pointer to them).
    folder = candidate_dir(load_params(params_file).model_store, second.run_dir / "candidate_model")
    kept = json.loads((folder / serving.TASKS_FILE).read_text())
    assert kept["tasks"] == ["wiki-topics-1", "wiki-topics-2"]
    base = load_file(tiny_model_dir / "model.safetensors")
    saved = load_file(folder / "model.safetensors")
    assert saved.keys() == base.keys()
    assert all((saved[k] == base[k]).all() for k in base)

    v2 = client_of(params_file).get_model_version_by_alias("forgetless-lm", "champion")
    assert str(v2.version) == "2"


def answers(model_dir: Path, prompts: list[str], task: str | None) -> list[str]:
    """What the pipeline's own loading answers for ``task`` (None: the default)."""
    model, tokenizer, router = serving.load_for_serving(model_dir)
    with router.answering(task) as m:
        return serving.generate(m, tokenizer, prompts, False, 6, 32)


def test_registered_model_answers_by_task_in_a_fresh_process(
    two_releases, tiny_model_dir, demo_dir, tmp_path
):
    params_file, first, second = two_releases
    params = load_params(params_file)
    records = [r for _, r in read_jsonl(demo_dir / "releases" / "wiki-topics-2" / "eval.jsonl")]
    records += [r for _, r in read_jsonl(demo_dir / "releases" / "wiki-topics-1" / "eval.jsonl")]
    prompts = [r["prompt"] for r in records[:4]] + [r["prompt"] for r in records[-4:]]
    tasks = ["wiki-topics-1", "wiki-topics-2", "base"]
    inputs = {"prompts": prompts, "tasks": tasks}
    out = run_outside_repo(
        SERVE_BY_TASK, tmp_path, params.tracking_uri, inputs, blocked=NOT_CF_STRATEGIES
    )

    v2_dir, v1_dir = (
        candidate_dir(params.model_store, r.run_dir / "candidate_model") for r in (second, first)
    )
    for task in tasks:  # the served model answers as the pipeline scored it
        assert out[task] == answers(v2_dir, prompts, task), task
    assert out["no task"] == out["wiki-topics-2"]  # the default: the latest release
    # Task 1 through v2 is task 1 through v1: learning release 2 changed nothing of it.
    assert out["wiki-topics-1"] == answers(v1_dir, prompts, "wiki-topics-1")
    # "base" is the base model itself; the columns or masks really differ from it.
    model, tokenizer = serving.load(tiny_model_dir)
    assert out["base"] == serving.generate(model, tokenizer, prompts, False, 6, 32)
    assert out["wiki-topics-2"] != out["base"]
    assert "unknown task 'wiki-topics-9'" in out["unknown"]
    assert "wiki-topics-1" in out["unknown"]  # the message lists the tasks learned
    assert not out["cf_strategies"].startswith(str(ROOT))  # the model's own copy of the code


def test_another_strategy_cannot_continue_a_task_champion(two_releases):
    params_file, _, _ = two_releases
    client = client_of(params_file)
    before = len(client.search_model_versions("name='forgetless-lm'"))
    with pytest.raises(ValueError, match="keeps parameters per task"):
        retrain(params_file=str(params_file), overrides={"train.strategy": "naive"})
    assert len(client.search_model_versions("name='forgetless-lm'")) == before
    champion = client.get_model_version_by_alias("forgetless-lm", "champion")
    assert str(champion.version) == "2"
