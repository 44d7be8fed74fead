"""The prepared GPU benchmark runs: ``benchmarks/gpu_throughput.py --smoke``, as a user would
start it, on the CPU in seconds (a tiny Llama, 1 warm-up and 2 timed steps per strategy)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

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
