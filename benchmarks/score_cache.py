"""The demo retrain's wall time with and without the score cache (``evaluate.score_cache``).

Release 1 is learned once (``make demo``'s retrain, default ``lwf``), which scores champion v1 on
the test probes and the release's eval items as a candidate. The workspace is then copied, and
release 2 is retrained from v1 in both copies, one after the other: with the cache, whose probe
step reads v1's answers it already gave, and without it, scoring every item again. Writes
``results/score_cache.json``: wall time, time per step and the champion answers read or computed.

    OMP_NUM_THREADS=2 python benchmarks/score_cache.py
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from flows.drivers.retrain import retrain

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "score_cache.json"


def run(work: Path, cache: bool) -> dict:
    overrides = {
        "workspace": str(work / "ws"),
        "versioning.remote": str(work / "dvc-remote"),
        "evaluate.score_cache": cache,
    }
    start = time.perf_counter()
    summary = retrain(params_file=str(ROOT / "params.yaml"), overrides=overrides)
    probes = json.loads((summary.run_dir / "probe_set.json").read_text())
    return {
        "release": summary.release,
        "score_cache": cache,
        "wall_seconds": time.perf_counter() - start,
        "step_seconds": summary.step_seconds,
        "champion_answers_cached": probes["baseline_cached"],
        "champion_answers_scored": probes["baseline_scored"],
        "gate_passed": summary.gate.passed,
    }


def main() -> None:
    base = ROOT / ".cache" / "bench-score-cache"
    first = base / "with-cache"
    rows = {}
    if not (first / "ws" / "mlflow.db").exists():
        rows["release 1"] = run(first, cache=True)
    second = base / "without-cache"
    shutil.rmtree(second, ignore_errors=True)
    shutil.copytree(first, second, symlinks=True)  # the same champion v1 and its records
    rows["release 2, score cache on"] = run(first, cache=True)
    rows["release 2, score cache off"] = run(second, cache=False)
    rows["threads"] = torch.get_num_threads()
    OUT.write_text(json.dumps(rows, indent=1))
    for name, row in rows.items():
        print(name, json.dumps(row))


if __name__ == "__main__":
    main()
