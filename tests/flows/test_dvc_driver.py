"""`dvc repro` runs the same steps as DVC stages over params.yaml (tiny model, real DVC)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import GENERAL_TASKS, write_params

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow  # eight stages, each a fresh process that imports torch


def test_dvc_repro_runs_the_gated_retrain(tmp_path, tiny_model_dir, demo_dir):
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ["dvc.yaml", "flows", "cf_strategies"]:
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, repo / name)
    params = yaml.safe_load(write_params(tmp_path, tiny_model_dir, demo_dir).read_text())
    shipped = yaml.safe_load((ROOT / "params.yaml").read_text())
    params = {
        k: {**shipped[k], **params.get(k, {})}
        if isinstance(shipped[k], dict)
        else params.get(k, shipped[k])
        for k in shipped
    }
    params["workspace"] = str(repo / "ws")
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}

    def run(*cmd):
        done = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done.stdout

    run("git", "init", "-q")
    run(sys.executable, "-m", "dvc", "init", "-q")
    run(sys.executable, "-m", "dvc", "repro")
    metrics = json.loads(run(sys.executable, "-m", "dvc", "metrics", "show", "--json"))
    values = next(iter(metrics.values()))["data"]["artifacts/dvc-run/metrics.json"]["data"]
    assert set(values) == {"new_task_score"} | {f"retention.{t}" for t in GENERAL_TASKS}
    promotion = json.loads((repo / "artifacts" / "dvc-run" / "promotion.json").read_text())
    assert promotion["promoted"] and promotion["champion_version"] == "1", promotion
    # the promote stage publishes what the flow publishes: the report and the accuracy matrix
    page = (repo / "artifacts" / "dvc-run" / "forgetting_report.html").read_text()
    assert "gate PASSED; promoted: v1 is champion" in page
    matrix = json.loads((repo / "ws" / "accuracy_matrix.json").read_text())
    assert [r["label"] for r in matrix["rows"]] == ["base", "v1"]
    assert matrix["rows"][1]["promoted"] is True
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert list(lock["stages"]) == [
        "version",
        "validate",
        "probes",
        "finetune",
        "evaluate",
        "gate",
        "register",
        "promote",
    ]
    again = run(sys.executable, "-m", "dvc", "repro")  # nothing changed: only `version` re-checks
    assert "Running stage 'version'" in again and "Running stage 'validate'" not in again

    # A change to a module a stage imports (not its own file) makes that stage, and only the
    # stages that run it, out of date.
    with open(repo / "flows" / "steps" / "modeling.py", "a") as f:
        f.write("\n# changed\n")
    status = json.loads(run(sys.executable, "-m", "dvc", "status", "--json"))
    stale = {name for name, changes in status.items() if "flows/steps/modeling.py" in str(changes)}
    assert stale == {"validate", "probes", "finetune", "evaluate", "promote"}, status
