"""Benchmarks run as a user starts them: ``benchmarks/gpu_throughput.py --smoke`` on the CPU in
seconds (a tiny Llama, 1 warm-up and 2 timed steps per strategy), and the continual benchmark's
quick mode (the tiny model through ``forgetless run``, release after release)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2 = ROOT / ".cache" / "models" / "smollm2-135m-instruct"
STRATEGIES = ["naive", "ewc", "lwf", "replay"]


def test_gpu_throughput_smoke_reports_every_strategy(tmp_path, request):
    out = tmp_path / "gpu_throughput.json"
    command = [sys.executable, "benchmarks/gpu_throughput.py", "--smoke", "--out", str(out)]
    command += ["--work", str(tmp_path / "work")]
    if not (SMOLLM2 / "config.json").is_file():  # its tokenizer: converting takes minutes
        command += ["--tokenizer", str(request.getfixturevalue("tiny_model_dir"))]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # robust on a shared 2-core machine
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "| llama-tiny | replay |" in done.stdout  # the markdown table

    results = json.loads(out.read_text())
    assert results["smoke"] and results["batch_size"] > 0 and results["lora_r"] > 0
    assert results["device"] and results["torch"] and results["transformers"]
    model = results["models"]["llama-tiny"]
    assert model["parameters"] > 0 and model["flop_parameters"] > 0
    assert list(model["strategies"]) == STRATEGIES
    for name, f in model["strategies"].items():
        assert f["steps"] == 2 and len(f["step_s"]) == 2, name
        assert all(math.isfinite(s) and s > 0 for s in f["step_s"]), name
        assert math.isfinite(f["median_step_s"]) and f["median_step_s"] > 0, name
        assert f["tokens_per_s"] > 0 and f["label_tokens_per_s"] > 0, name
        assert f["peak_memory_bytes"] > 0, name
        assert f["model_tflops_per_s"] > 0, name
        if not torch.cuda.is_available():
            assert f["mfu"] is None, name
    # the release-2 setup: the strategies carry release 1's state into the timed steps
    strategies = model["strategies"]
    assert strategies["replay"]["carried"]["replay"]["buffered_rows"] > 0
    assert strategies["replay"]["replayed_tokens_per_s"] > 0
    assert strategies["ewc"]["carried"]["ewc"]["importance_values"] > 0
    assert strategies["naive"]["replayed_tokens"] == 0


@pytest.mark.slow
def test_continual_quick_mode_runs_each_release_through_the_cli_and_resumes(tmp_path):
    """``benchmarks/continual.py --quick``: each release through ``forgetless run`` on the tiny
    model; each row agrees with its run's summary; the earlier release is a probe task of the
    next; a rerun runs nothing again."""
    results, work = tmp_path / "results", tmp_path / "work"
    command = [sys.executable, "benchmarks/continual.py", "--quick", "--strategies", "lwf"]
    command += ["--releases", "2", "--work", str(work), "--results", str(results)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads((results / "continual_quick.json").read_text())["lwf"]
    assert list(rows) == ["wiki-topics-1", "wiki-topics-2"]
    for name, row in rows.items():
        summary = json.loads((Path(row["run_dir"]) / "summary.json").read_text())
        assert summary["release"] == name and summary["strategy"] == "lwf"
        assert row["new_task"] == summary["eval"]["new_task_score"]
        assert row["passed"] == summary["gate"]["passed"] and row["promoted"]  # thresholds 0
        assert set(row["kept_vs_base"]) == {"country-facts", "general-knowledge", "world-cities"}
        assert all(0 <= v <= 1 for v in row["kept_vs_base"].values())
        # the champion after the release is the candidate: the gate's score on its own release
        assert row["champion_scores"][name] == pytest.approx(row["new_task"])
    assert "wiki-topics-1" in rows["wiki-topics-2"]["kept_vs_champion"]  # an earlier release
    R = [[rows["wiki-topics-1"]["champion_scores"]["wiki-topics-1"], math.nan],
         [rows["wiki-topics-2"]["champion_scores"][n] for n in rows]]  # fmt: skip
    acc, bwt = (R[1][0] + R[1][1]) / 2, R[1][0] - R[0][0]
    line = next(li for li in done.stdout.splitlines() if li.startswith("| lwf |"))
    assert f"| {acc:.3f} | {bwt:+.3f} |" in line and "| 2/2 |" in line
    assert (results / "continual_quick.png").stat().st_size > 10_000

    runs = sorted((work / "lwf" / "workspace" / "runs").iterdir())
    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert sorted((work / "lwf" / "workspace" / "runs").iterdir()) == runs  # nothing rerun
    assert line in again.stdout
